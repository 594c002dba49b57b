//! `lb-bench --profile CASE@CONFIG`: where one data-plane case's time goes, stage by stage.
//!
//! The case is set up as `--spin` sets it up (the benchmark's fixture, the program loaded),
//! then `perf record -e cpu-clock` watches this process only while the case spins (it is
//! started disabled and enabled through its control FIFO, so the verifier and the setup are
//! not sampled). Each sample's instruction address is then placed: inside the program's JIT
//! image it falls in a line record (the program's BTF line info, read from the kernel), and
//! the record's source file names the stage; outside it, the kernel symbol perf resolved
//! names a group (the flow table's hash map, the test-run harness...). Library code the
//! program inlined (aya's helpers, core's integer methods) counts for the program's own line
//! that inlined it.
//!
//! The ns column shares out the process's CPU time per run, not BPF_PROG_TEST_RUN's own
//! duration: with one run per call the syscall, the frame's copies and the user-space loop
//! lie outside the kernel's timer but inside the samples, so the kernel's figure times the
//! shares would shrink every stage. Both figures are printed.
//!
//! perf is run as a tool (Debian's linux-perf) rather than through perf_event_open here: it
//! resolves kernel symbols and keeps its data file for anyone who wants to dig further.
//! aya-obj parses BTF, but its string lookup is private to it; the few lines below read the
//! string section, which is all line records refer to.

use std::{
    ffi::CString,
    fmt::Write as _,
    fs::{self, File, OpenOptions},
    io::{Read as _, Write as _},
    os::{
        fd::{AsRawFd as _, BorrowedFd},
        unix::{ffi::OsStrExt as _, fs::OpenOptionsExt as _, process::ExitStatusExt as _},
    },
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    bpf,
    dataplane::{self, SpinAt},
};

mod attribution;
pub use attribution::*;

/// What to profile and where to put the result.
#[derive(Clone, Debug)]
pub struct Options {
    pub case: String,
    pub config: String,
    pub secs: f64,
    /// Runs per BPF_PROG_TEST_RUN call (above 1 only for cases whose frame takes the same
    /// path again, as for `--spin`).
    pub repeat: u32,
    /// Where profile.md and profile.perf.data go.
    pub out: PathBuf,
}

/// CPU time between samples (cpu-clock counts nanoseconds): 10,000 samples a second.
const SAMPLE_PERIOD_NS: u64 = 100_000;

/// How long perf may take to start, answer its control FIFO, or finish writing.
const PERF_TIMEOUT: Duration = Duration::from_secs(30);

/// Profiles the case and returns the Markdown report (also written to `out/profile.md`).
pub fn run(opts: &Options) -> Result<String> {
    if opts.repeat == 0 {
        bail!("--spin-repeat must be at least 1");
    }
    let perf_version = Command::new("perf").arg("--version").output().context(
        "running perf --version (install Debian's linux-perf; `./x.sh bench --profile ...` does)",
    )?;
    if !perf_version.status.success() {
        bail!(
            "perf --version failed ({}): {}",
            perf_version.status,
            String::from_utf8_lossy(&perf_version.stderr).trim()
        );
    }
    fs::create_dir_all(&opts.out).with_context(|| format!("creating {}", opts.out.display()))?;
    let data = opts.out.join("profile.perf.data");
    // perf would keep a previous file as .old; this run's is the one that matters.
    let _ = fs::remove_file(&data);

    let mut perf: Option<Perf> = None;
    let mut program: Option<Program> = None;
    let mut cpu_start = Duration::ZERO;
    let mut cpu = Duration::ZERO;
    let mut wall_start = Instant::now();
    let mut wall = Duration::ZERO;
    let spun = dataplane::spin(
        &opts.case,
        &opts.config,
        opts.secs,
        opts.repeat,
        &mut |at, prog| match at {
            SpinAt::Start => {
                // Read while the program is loaded: its addresses are gone once it is not.
                program = Some(Program::read(prog)?);
                let mut p = Perf::start(&data, &opts.out)?;
                p.control("enable")?;
                perf = Some(p);
                cpu_start = process_cpu_time()?;
                wall_start = Instant::now();
                Ok(())
            }
            SpinAt::Stop => {
                cpu = process_cpu_time()? - cpu_start;
                wall = wall_start.elapsed();
                let p = perf.as_mut().context("perf was not started")?;
                p.control("disable")?;
                p.finish()
            }
        },
    )?;
    drop(perf);
    let program = program.context("the case never started spinning")?;
    if spun.runs == 0 {
        bail!("the case ran no packets (--profile-secs too short?)");
    }
    let script = Command::new("perf")
        .arg("script")
        .arg("-i")
        .arg(&data)
        .args(["-F", "ip,sym"])
        .stderr(Stdio::null())
        .output()
        .context("running perf script")?;
    if !script.status.success() {
        bail!(
            "perf script -i {} failed ({})",
            data.display(),
            script.status
        );
    }
    let samples = parse_perf_script(&String::from_utf8_lossy(&script.stdout));
    if samples.is_empty() {
        bail!(
            "perf recorded no samples in {} (perf_event_paranoid? see {})",
            data.display(),
            opts.out.join("profile.perf.log").display()
        );
    }
    let profile = attribute(&program.functions, &program.lines, &samples, opts.repeat);
    if profile.in_program == 0 {
        bail!(
            "none of the {} samples fell in the program's {} functions (JIT addresses read \
             wrong, or the case never ran the program?)",
            profile.samples,
            program.functions.len()
        );
    }
    let summary = Summary {
        title: format!("{} @ {}", opts.case, opts.config),
        secs: wall.as_secs_f64(),
        runs: spun.runs,
        repeat: opts.repeat,
        cpu_ns_per_run: cpu.as_nanos() as f64 / spun.runs as f64,
        kernel_ns_per_run: spun.kernel_ns / spun.runs as f64,
        size_note: program.size_note,
    };
    let md = render(&summary, &profile);
    let path = opts.out.join("profile.md");
    fs::write(&path, &md).with_context(|| format!("writing {}", path.display()))?;
    Ok(md)
}

/// The process's CPU time (user and system, all threads): what per-task cpu-clock samples
/// are taken from.
fn process_cpu_time() -> Result<Duration> {
    // SAFETY: a zeroed rusage is a valid value; getrusage only writes into it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a live rusage for the duration of the call.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        bail!("getrusage: {}", std::io::Error::last_os_error());
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    Ok(tv(usage.ru_utime) + tv(usage.ru_stime))
}

// ---- the loaded program --------------------------------------------------------------------

/// What the kernel says about the loaded program, with line records resolved to text.
pub struct Program {
    pub functions: Vec<Function>,
    pub lines: Vec<Line>,
    /// The program-size note of the data-plane table.
    pub size_note: String,
}

impl Program {
    /// Reads a loaded program's JIT layout, line records and BTF strings.
    pub fn read(prog: BorrowedFd<'_>) -> Result<Program> {
        let jit = bpf::jit_lines(prog)?;
        if jit.btf_id == 0 {
            bail!("the program has no BTF, so its line records name no file");
        }
        let blob = bpf::btf_by_id(jit.btf_id)?;
        let strings = BtfStrings::parse(&blob)?;
        let lines = jit
            .lines
            .iter()
            .map(|(addr, l)| {
                Ok(Line {
                    addr: *addr,
                    file: strings.at(l.file_name_off)?.to_string(),
                    line: l.line_col >> 10,
                    source: strings.at(l.line_off)?.trim().to_string(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Program {
            functions: jit
                .functions
                .iter()
                .map(|&(start, len)| Function { start, len })
                .collect(),
            lines,
            size_note: bpf::prog_size(prog)?.note(),
        })
    }
}

/// The string section of a BTF blob, which line records point into.
pub struct BtfStrings<'a> {
    strings: &'a [u8],
}

impl<'a> BtfStrings<'a> {
    /// Reads the header (`struct btf_header`: magic, version, flags, hdr_len, type_off,
    /// type_len, str_off, str_len) of a blob in this machine's byte order.
    pub fn parse(blob: &'a [u8]) -> Result<Self> {
        let word = |at: usize| -> Result<u32> {
            Ok(u32::from_ne_bytes(
                blob.get(at..at + 4)
                    .context("BTF blob shorter than its header")?
                    .try_into()
                    .expect("4 bytes"),
            ))
        };
        let magic = u16::from_ne_bytes([
            blob.first().copied().unwrap_or(0),
            blob.get(1).copied().unwrap_or(0),
        ]);
        if magic != 0xeb9f {
            bail!("not BTF in this machine's byte order (magic {magic:#06x})");
        }
        let hdr_len = word(4)? as usize;
        let (str_off, str_len) = (word(16)? as usize, word(20)? as usize);
        let start = hdr_len + str_off;
        let strings = blob.get(start..start + str_len).with_context(|| {
            format!(
                "BTF string section {start}+{str_len} past the blob's {} bytes",
                blob.len()
            )
        })?;
        Ok(BtfStrings { strings })
    }

    /// The NUL-terminated string at `offset`.
    pub fn at(&self, offset: u32) -> Result<&'a str> {
        let rest = self.strings.get(offset as usize..).with_context(|| {
            format!(
                "BTF string offset {offset} past the section's {} bytes",
                self.strings.len()
            )
        })?;
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end])
            .with_context(|| format!("BTF string at {offset} is not UTF-8"))
    }
}

// ---- perf ----------------------------------------------------------------------------------

/// A `perf record` of this process, started disabled and switched through its control FIFO.
struct Perf {
    child: Option<Child>,
    ctl: File,
    ack: File,
    /// The two FIFOs, removed when done.
    fifos: [PathBuf; 2],
    log: PathBuf,
}

impl Perf {
    fn start(data: &Path, dir: &Path) -> Result<Perf> {
        let ctl_path = dir.join("profile.perf.ctl");
        let ack_path = dir.join("profile.perf.ack");
        let log = dir.join("profile.perf.log");
        for p in [&ctl_path, &ack_path] {
            let _ = fs::remove_file(p);
            let c = CString::new(p.as_os_str().as_bytes()).context("a path with a NUL")?;
            // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
            if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
                bail!(
                    "mkfifo {}: {}",
                    p.display(),
                    std::io::Error::last_os_error()
                );
            }
        }
        // Both ends opened read-write so neither open waits for perf to open its end.
        let open = |p: &Path| {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(p)
                .with_context(|| format!("opening {}", p.display()))
        };
        let (ctl, ack) = (open(&ctl_path)?, open(&ack_path)?);
        let child = Command::new("perf")
            // A fixed period rather than perf's default frequency mode, whose period drifts:
            // with a fixed one every sample stands for the same CPU time.
            .args([
                "record",
                "-e",
                "cpu-clock",
                "-c",
                &SAMPLE_PERIOD_NS.to_string(),
            ])
            // Started disabled (-D -1): enabled once the case spins.
            .args(["-q", "--no-buildid", "-D", "-1"])
            .arg("-p")
            .arg(std::process::id().to_string())
            .arg("-o")
            .arg(data)
            .arg(format!(
                "--control=fifo:{},{}",
                ctl_path.display(),
                ack_path.display()
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).with_context(|| format!("creating {}", log.display()))?)
            .spawn()
            .context("starting perf record")?;
        Ok(Perf {
            child: Some(child),
            ctl,
            ack,
            fifos: [ctl_path, ack_path],
            log,
        })
    }

    /// Sends a control command ("enable", "disable") and waits for perf's "ack".
    fn control(&mut self, cmd: &str) -> Result<()> {
        (&self.ctl)
            .write_all(format!("{cmd}\n").as_bytes())
            .context("writing perf's control FIFO")?;
        let until = Instant::now() + PERF_TIMEOUT;
        let mut got = Vec::new();
        // perf writes "ack\n" and its C string's NUL.
        while !got.windows(4).any(|w| w == b"ack\n") {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                bail!(
                    "perf did not acknowledge {cmd:?} within {PERF_TIMEOUT:?}{}",
                    self.log_tail()
                );
            }
            let mut pfd = libc::pollfd {
                fd: self.ack.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let ms = left.as_millis().min(200) as i32;
            // SAFETY: one live pollfd for the duration of the call.
            let n = unsafe { libc::poll(&mut pfd, 1, ms) };
            if n < 0 {
                bail!(
                    "poll on perf's ack FIFO: {}",
                    std::io::Error::last_os_error()
                );
            }
            if n == 0 {
                // Perf may have died before opening its FIFOs (bad option, no permission).
                if let Some(child) = self.child.as_mut()
                    && let Some(status) = child.try_wait().context("waiting for perf")?
                {
                    bail!(
                        "perf record exited before {cmd:?} ({status}){}",
                        self.log_tail()
                    );
                }
                continue;
            }
            let mut buf = [0u8; 64];
            let n = (&self.ack)
                .read(&mut buf)
                .context("reading perf's ack FIFO")?;
            got.extend_from_slice(&buf[..n]);
        }
        Ok(())
    }

    /// Stops perf with SIGINT (it writes its data file and exits), waiting a bounded time.
    fn finish(&mut self) -> Result<()> {
        let mut child = self.child.take().context("perf already finished")?;
        // SAFETY: signalling our own child by its pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let until = Instant::now() + PERF_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().context("waiting for perf")? {
                // perf ends on SIGINT by re-raising it once its data file is written.
                if !status.success() && status.signal() != Some(libc::SIGINT) {
                    bail!("perf record failed ({status}){}", self.log_tail());
                }
                return Ok(());
            }
            if Instant::now() > until {
                let _ = child.kill();
                let _ = child.wait();
                bail!("perf record did not stop within {PERF_TIMEOUT:?} of SIGINT");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_tail(&self) -> String {
        let log = fs::read_to_string(&self.log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(3).collect();
        if tail.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                tail.into_iter().rev().collect::<Vec<_>>().join(" / ")
            )
        }
    }
}

impl Drop for Perf {
    /// On an error path perf is still running: end it (our own child, by its handle).
    /// Either way the FIFOs go.
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        for f in &self.fifos {
            let _ = fs::remove_file(f);
        }
    }
}

/// `perf script -F ip,sym` lines: a hex address and a symbol (`[unknown]` if none).
pub fn parse_perf_script(text: &str) -> Vec<Sample> {
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let (ip, sym) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
            Some(Sample {
                ip: u64::from_str_radix(ip, 16).ok()?,
                sym: sym.trim().to_string(),
            })
        })
        .collect()
}

// ---- report --------------------------------------------------------------------------------

/// The spin's own figures, for the report's header and the ns column.
#[derive(Clone, Debug)]
pub struct Summary {
    pub title: String,
    /// How long the case spun, wall clock.
    pub secs: f64,
    pub runs: u64,
    pub repeat: u32,
    /// The process's CPU time over the spin, per program run: what the samples divide.
    pub cpu_ns_per_run: f64,
    /// BPF_PROG_TEST_RUN's own duration per run, for comparison with the benchmark table.
    pub kernel_ns_per_run: f64,
    pub size_note: String,
}

/// How many source lines the report lists.
const TOP_LINES: usize = 15;

fn cell(s: &str) -> String {
    let s = s.replace('|', "\\|");
    if s.chars().count() > 70 {
        format!("{}…", s.chars().take(69).collect::<String>())
    } else {
        s
    }
}

/// The Markdown report: stages with their share and ns per packet, then the hottest lines.
pub fn render(s: &Summary, p: &Profile) -> String {
    let pct = |n: u64| 100.0 * n as f64 / p.samples.max(1) as f64;
    let mut md = String::new();
    let _ = writeln!(md, "## Profile: {}\n", s.title);
    let _ = writeln!(
        md,
        "`perf record -e cpu-clock -c {SAMPLE_PERIOD_NS}` of this process for {:.1} s: {} \
         samples (one every {} µs of CPU), {} program runs ({} per BPF_PROG_TEST_RUN call), \
         {:.1}% of samples in the program.  ",
        s.secs,
        p.samples,
        SAMPLE_PERIOD_NS / 1000,
        s.runs,
        s.repeat,
        pct(p.in_program)
    );
    let _ = writeln!(
        md,
        "CPU time per run {:.1} ns (the process's CPU time over the spin, divided by the runs; \
         the ns column shares it out); the kernel timed {:.1} ns per run.  ",
        s.cpu_ns_per_run, s.kernel_ns_per_run
    );
    let _ = writeln!(md, "{}\n", s.size_note);
    md.push_str("| stage | share of samples | ns per packet |\n|---|---:|---:|\n");
    for (stage, n) in &p.stages {
        let _ = writeln!(
            md,
            "| {stage} | {:.1}% | {:.1} |",
            pct(*n),
            pct(*n) / 100.0 * s.cpu_ns_per_run
        );
    }
    let _ = writeln!(md, "| total | 100.0% | {:.1} |", s.cpu_ns_per_run);
    if !p.symbols.is_empty() {
        md.push_str("\nThe most sampled symbols outside the program (0.1% and up):\n\n");
    }
    for (group, syms) in &p.symbols {
        let top: Vec<String> = syms
            .iter()
            .take(5)
            .filter(|(_, n)| pct(*n) >= 0.05)
            .map(|(sym, n)| format!("{sym} {:.1}%", pct(*n)))
            .collect();
        if !top.is_empty() {
            let _ = writeln!(md, "- {group}: {}", top.join(", "));
        }
    }
    let _ = writeln!(
        md,
        "\nTop {TOP_LINES} source lines of the program (library code under the line that \
         inlined it):\n\n| line | source | stage | share |\n|---|---|---|---:|"
    );
    for (l, n) in p.lines.iter().take(TOP_LINES) {
        let at = match &l.inlined_into {
            Some((f, n)) => format!("{}:{} (in {f}:{n})", l.file, l.line),
            None => format!("{}:{}", l.file, l.line),
        };
        let _ = writeln!(
            md,
            "| {at} | `{}` | {} | {:.1}% |",
            cell(&l.source).replace('`', "'"),
            l.stage,
            pct(*n)
        );
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perf_script_lines_parse_and_junk_is_skipped() {
        let s = parse_perf_script(
            " ffffffff81709c5a fdget_pos\n ffffffffc0012345 [unknown]\n\nnot a sample\n 55d0c0 main\n",
        );
        assert_eq!(
            s,
            vec![
                Sample {
                    ip: 0xffff_ffff_8170_9c5a,
                    sym: "fdget_pos".into()
                },
                Sample {
                    ip: 0xffff_ffff_c001_2345,
                    sym: "[unknown]".into()
                },
                Sample {
                    ip: 0x55d0c0,
                    sym: "main".into()
                },
            ]
        );
    }

    #[test]
    fn btf_strings_are_read_from_the_string_section() {
        // Header of 24 bytes, 4 bytes of "types", then "\0a.rs\0x\0".
        let strings = b"\0a.rs\0x\0";
        let mut blob = Vec::new();
        blob.extend_from_slice(&0xeb9fu16.to_ne_bytes());
        blob.extend_from_slice(&[1, 0]);
        for w in [24u32, 0, 4, 4, strings.len() as u32] {
            blob.extend_from_slice(&w.to_ne_bytes());
        }
        blob.extend_from_slice(&[0xaa; 4]);
        blob.extend_from_slice(strings);
        let s = BtfStrings::parse(&blob).unwrap();
        assert_eq!(s.at(1).unwrap(), "a.rs");
        assert_eq!(s.at(6).unwrap(), "x");
        assert_eq!(s.at(0).unwrap(), "");
        assert!(s.at(100).is_err());
        assert!(BtfStrings::parse(&blob[..10]).is_err());
    }

    #[test]
    fn the_report_shares_cpu_time_per_run_out_by_samples() {
        let p = Profile {
            samples: 4,
            in_program: 3,
            stages: vec![(PARSE.into(), 3), (HARNESS.into(), 1)],
            lines: vec![],
            symbols: vec![],
        };
        let s = Summary {
            title: "t".into(),
            secs: 1.0,
            runs: 10,
            repeat: 1,
            cpu_ns_per_run: 100.0,
            kernel_ns_per_run: 80.0,
            size_note: "program: 1 instructions".into(),
        };
        let md = render(&s, &p);
        assert!(md.contains("| parse | 75.0% | 75.0 |"), "{md}");
        assert!(md.contains("| test-run harness | 25.0% | 25.0 |"), "{md}");
        assert!(md.contains("program: 1 instructions"), "{md}");
    }
}
