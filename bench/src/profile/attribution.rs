//! Where a sample's time goes: the pure half of `--profile` (no BPF, no perf). A sample in
//! the program counts for the line record at or below its address, and that record's source
//! file names the stage; library code the program inlined counts for the program's own line
//! before it; a sample elsewhere counts for the kernel group its symbol belongs to.

use std::collections::HashMap;

/// One JIT-compiled function of the program: its machine code's start and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Function {
    pub start: u64,
    pub len: u32,
}

impl Function {
    fn contains(&self, ip: u64) -> bool {
        ip >= self.start && ip < self.start + u64::from(self.len)
    }
}

/// A line record: the JIT address its code starts at, and the source it came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub addr: u64,
    pub file: String,
    pub line: u32,
    pub source: String,
}

/// One perf sample: the instruction address and the kernel symbol perf gave it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sample {
    pub ip: u64,
    pub sym: String,
}

/// A hot source line: where the sampled code came from, and, for library code, the
/// program's own line that inlined it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct HotLine {
    /// The file, as [`short_name`] names it.
    pub file: String,
    pub line: u32,
    pub source: String,
    /// The workspace line (file name, line) a library line is counted for.
    pub inlined_into: Option<(String, u32)>,
    pub stage: String,
}

/// Samples counted by stage and by source line.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Profile {
    pub samples: u64,
    pub in_program: u64,
    /// Stages, most samples first.
    pub stages: Vec<(String, u64)>,
    /// Program source lines, most samples first.
    pub lines: Vec<(HotLine, u64)>,
    /// The symbols of each group outside the program (in the order of `stages`), most
    /// samples first.
    pub symbols: Vec<(String, Vec<(String, u64)>)>,
}

pub const PARSE: &str = "parse";
pub const POLICY: &str = "policy";
pub const SELECT: &str = "select";
pub const REWRITE: &str = "rewrite and transmit";
pub const COUNTERS: &str = "counters";
pub const ICMP: &str = "icmp";
pub const PIPELINE: &str = "pipeline (glue)";
pub const NO_LINE: &str = "program, no line record";
pub const FLOW_TABLE: &str = "kernel: flow table (hash map)";
pub const TRIE: &str = "kernel: drop-list trie";
pub const FIB: &str = "kernel: FIB lookup";
pub const HELPERS: &str = "kernel: other helpers";
pub const HARNESS: &str = "test-run harness";
pub const USER: &str = "lb-bench in user space";
pub const OTHER_PROGS: &str = "other BPF programs";
pub const OTHER: &str = "other (kernel)";

/// Whether a source path is library code (the cargo registry, the Rust toolchain's sources)
/// rather than the workspace's own.
pub fn is_library(path: &str) -> bool {
    path.is_empty()
        || path.starts_with("/rustc/")
        || [
            "/.cargo/registry/",
            "/.cargo/git/",
            "/.rustup/",
            "/rustlib/",
        ]
        .iter()
        .any(|d| path.contains(d))
}

/// lb-common's code: small functions both sides share (filter slots, hashes), inlined into
/// the stage that calls them.
fn is_common(path: &str) -> bool {
    path.contains("/lb-common/")
}

fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// How the report names a source file: the eBPF crate's files by name, another workspace
/// crate's with the crate (lb-common/lib.rs), library files by name.
pub fn short_name(path: &str) -> String {
    if !is_library(path)
        && let Some((dir, rest)) = path.rsplit_once("/src/")
    {
        let krate = file_name(dir);
        if krate != "lb-ebpf" {
            return format!("{krate}/{rest}");
        }
        return rest.to_string();
    }
    file_name(path).to_string()
}

/// The stage a workspace source file belongs to.
pub fn stage_of_file(path: &str) -> String {
    if path.contains("/lb-common/") {
        return PIPELINE.into();
    }
    let name = file_name(path);
    match name {
        "parse.rs" | "frame.rs" => PARSE,
        "policy.rs" => POLICY,
        "select.rs" | "persist.rs" | "leastconn.rs" | "share.rs" => SELECT,
        "transmit.rs" | "tunnel.rs" | "nat.rs" | "csum.rs" => REWRITE,
        "count.rs" => COUNTERS,
        "icmp.rs" | "refuse.rs" => ICMP,
        "main.rs" => PIPELINE,
        other => other,
    }
    .into()
}

/// The group of a sample outside the program, by its address (user or kernel) and symbol.
/// Syscall entry and the frame's copies count as the harness only with one run per call;
/// with many they are rare and shown as they are.
pub fn kernel_group(ip: u64, sym: &str, repeat: u32) -> &'static str {
    if ip < 1 << 63 {
        return USER;
    }
    let sym = sym.split("+0x").next().unwrap_or(sym);
    // Without leading underscores and the compiler's suffixes (.isra.0, .constprop.0, .cold).
    let bare = sym.trim_start_matches('_');
    let bare = bare.split('.').next().unwrap_or(bare);
    // The dispatcher is how any XDP caller enters the program; the test run is that caller.
    let harness = [
        "bpf_test_run",
        "bpf_prog_test_run_xdp",
        "local_bh_enable_ip",
        "read_tsc",
    ];
    if harness.contains(&bare)
        || bare.starts_with("bpf_test_timer_")
        || bare.starts_with("ktime_get")
        || bare.starts_with("bpf_dispatcher_")
    {
        return HARNESS;
    }
    let syscall = [
        "do_syscall_64",
        "x64_sys_bpf",
        "sys_bpf",
        "do_sys_bpf",
        "copy_from_user",
        "copy_to_user",
        "rep_movs_alternative",
        "check_object_size",
        "bpf_test_init",
        "bpf_test_finish",
        "xdp_convert_md_to_buff",
        "xdp_convert_buff_to_md",
        "kfree",
        "kmalloc",
        "memcpy",
        "memset",
        "pi_memcpy",
        "pi_memset",
        "memchr_inv",
        "security_bpf",
        "fdget",
        "bpf_prog_get",
        "bpf_prog_put",
        "bpf_cgroup_storage_alloc",
        "bpf_cgroup_storage_free",
        "virt_addr_valid",
        "is_vmalloc_addr",
        "check_heap_object",
        "check_stack_object",
        "bpf_ctx_init",
        "bpf_ctx_finish",
        "bpf_check_uarg_tail_zero",
        "rcu_read_lock",
        "rcu_read_unlock",
        "x64_sys_call",
    ];
    if repeat == 1
        && (syscall.contains(&bare)
            || bare.starts_with("entry_SYSCALL")
            || bare.starts_with("syscall_")
            || bare.starts_with("kmalloc")
            || bare.starts_with("copy_user"))
    {
        return HARNESS;
    }
    if bare.starts_with("htab_")
        || [
            "lookup_nulls_elem_raw",
            "lookup_elem_raw",
            "memcmp",
            "prealloc_lru_pop",
        ]
        .contains(&bare)
        || bare.starts_with("jhash")
        || bare.starts_with("bpf_lru_")
    {
        return FLOW_TABLE;
    }
    if bare.starts_with("trie_") {
        return TRIE;
    }
    if ["bpf_fib_", "fib_", "ip6_", "fib6_"]
        .iter()
        .any(|p| bare.starts_with(p))
    {
        return FIB;
    }
    if is_jit_symbol(sym) {
        return OTHER_PROGS;
    }
    if bare.starts_with("bpf_") {
        return HELPERS;
    }
    OTHER
}

/// A JIT-compiled program's kernel symbol: `bpf_prog_<16 hex digits of its tag>_<name>`.
fn is_jit_symbol(sym: &str) -> bool {
    sym.strip_prefix("bpf_prog_")
        .and_then(|rest| rest.split_once('_'))
        .is_some_and(|(tag, _)| tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// Places every sample: in the program, the line record at or below its address, library
/// records counting for the nearest workspace record before them in the same function (or,
/// failing that, after); elsewhere, the kernel group of its symbol.
pub fn attribute(
    functions: &[Function],
    lines: &[Line],
    samples: &[Sample],
    repeat: u32,
) -> Profile {
    let mut lines: Vec<&Line> = lines.iter().collect();
    lines.sort_by_key(|l| l.addr);
    let func_of = |addr: u64| functions.iter().position(|f| f.contains(addr));
    let funcs: Vec<Option<usize>> = lines.iter().map(|l| func_of(l.addr)).collect();
    // For each record, the workspace record it counts for. Library code counts for the
    // stage that inlined it: the stage line before it; after a line of the pipeline's own
    // (main.rs: a call such as `select::established(..)` or `count::packet(..)`, whose
    // callee's code follows), the first line after it that is not lb-common's, as
    // lb-common's small functions always do.
    let glue = |j: usize| stage_of_file(&lines[j].file) == PIPELINE;
    let owner: Vec<Option<usize>> = (0..lines.len())
        .map(|i| {
            let file = &lines[i].file;
            if !is_library(file) && !is_common(file) {
                return Some(i);
            }
            let same = |j: &usize| funcs[*j] == funcs[i] && !is_library(&lines[*j].file);
            let before = (0..i)
                .rev()
                .find(|j| same(j) && !is_common(&lines[*j].file));
            // lb-common's functions compute what the stage then looks up (a filter's slot):
            // they always count for what follows.
            if before.is_some_and(|j| !glue(j)) && !is_common(file) {
                return before;
            }
            (i + 1..lines.len())
                .find(|j| same(j) && !is_common(&lines[*j].file))
                .or(before)
                .or_else(|| (0..i).rev().find(same))
        })
        .collect();

    let mut stages: HashMap<String, u64> = HashMap::new();
    let mut hot: HashMap<HotLine, u64> = HashMap::new();
    let mut symbols: HashMap<&str, HashMap<String, u64>> = HashMap::new();
    let mut in_program = 0;
    for s in samples {
        let Some(f) = func_of(s.ip) else {
            let group = kernel_group(s.ip, &s.sym, repeat);
            *symbols
                .entry(group)
                .or_default()
                .entry(s.sym.clone())
                .or_default() += 1;
            *stages.entry(group.into()).or_default() += 1;
            continue;
        };
        in_program += 1;
        let at = lines.partition_point(|l| l.addr <= s.ip);
        let Some(i) = at.checked_sub(1).filter(|&i| funcs[i] == Some(f)) else {
            *stages.entry(NO_LINE.into()).or_default() += 1;
            continue;
        };
        let l = lines[i];
        let (stage, inlined_into) = match owner[i] {
            Some(o) if o == i => (stage_of_file(&l.file), None),
            Some(o) => (
                stage_of_file(&lines[o].file),
                Some((short_name(&lines[o].file), lines[o].line)),
            ),
            None => (format!("library: {}", file_name(&l.file)), None),
        };
        *stages.entry(stage.clone()).or_default() += 1;
        let key = HotLine {
            file: short_name(&l.file),
            line: l.line,
            source: l.source.clone(),
            inlined_into,
            stage,
        };
        *hot.entry(key).or_default() += 1;
    }
    let stages = by_count(stages);
    let symbols = stages
        .iter()
        .filter_map(|(g, _)| Some((g.clone(), by_count(symbols.remove(g.as_str())?))))
        .collect();
    Profile {
        samples: samples.len() as u64,
        in_program,
        symbols,
        stages,
        lines: by_count(hot),
    }
}

/// Most first; ties in a stable order.
fn by_count<K: Ord>(m: HashMap<K, u64>) -> Vec<(K, u64)> {
    let mut v: Vec<(K, u64)> = m.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v
}

impl PartialOrd for HotLine {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for HotLine {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (
            &self.file,
            self.line,
            &self.inlined_into,
            &self.source,
            &self.stage,
        )
            .cmp(&(
                &other.file,
                other.line,
                &other.inlined_into,
                &other.source,
                &other.stage,
            ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WS: &str = "/work/lb/lb-ebpf/src";
    const REG: &str =
        "/root/.cargo/registry/src/index.crates.io-1949cf8c6b5b557f/aya-ebpf-0.3.0/src/helpers.rs";
    const CORE: &str = "/root/.rustup/toolchains/1.98.0-x86_64-unknown-linux-gnu/lib/rustlib/src/rust/library/core/src/num/uint_macros.rs";

    fn line(addr: u64, file: &str, n: u32) -> Line {
        Line {
            addr,
            file: file.into(),
            line: n,
            source: format!("source of {}:{n}", file_name(file)),
        }
    }

    fn at(ip: u64) -> Sample {
        Sample {
            ip,
            sym: "bpf_prog_0123456789abcdef_lb_xdp".into(),
        }
    }

    fn kernel(sym: &str) -> Sample {
        Sample {
            ip: 0xffff_ffff_8100_0000,
            sym: sym.into(),
        }
    }

    fn stage(p: &Profile, name: &str) -> u64 {
        p.stages
            .iter()
            .find(|(s, _)| s == name)
            .map_or(0, |(_, n)| *n)
    }

    /// Two functions: the entry point (parse, an inlined core helper, policy) and a
    /// subprogram that starts with library code before any workspace line.
    fn program() -> (Vec<Function>, Vec<Line>) {
        let base = 0xffff_ffff_c000_0000;
        let functions = vec![
            Function {
                start: base,
                len: 0x100,
            },
            Function {
                start: base + 0x1000,
                len: 0x80,
            },
        ];
        let lines = vec![
            line(base, &format!("{WS}/main.rs"), 53),
            line(base + 0x10, &format!("{WS}/parse.rs"), 52),
            line(base + 0x20, CORE, 703),
            line(base + 0x30, &format!("{WS}/policy.rs"), 20),
            line(base + 0x40, REG, 50),
            line(base + 0x1000, REG, 60),
            line(base + 0x1010, &format!("{WS}/count.rs"), 9),
        ];
        (functions, lines)
    }

    #[test]
    fn a_sample_counts_for_the_line_record_at_or_below_it() {
        let (f, l) = program();
        let b = f[0].start;
        let p = attribute(
            &f,
            &l,
            &[at(b + 0x10), at(b + 0x1f), at(b + 0x30), at(b + 0x3f)],
            1,
        );
        assert_eq!(stage(&p, PARSE), 2);
        assert_eq!(stage(&p, POLICY), 2);
        assert_eq!(p.in_program, 4);
        assert_eq!(p.lines[0].0.file, "parse.rs");
        assert_eq!(p.lines[0].1, 2);
    }

    #[test]
    fn inlined_library_code_counts_for_the_workspace_line_before_it() {
        let (f, l) = program();
        let b = f[0].start;
        let p = attribute(&f, &l, &[at(b + 0x25), at(b + 0x45)], 1);
        assert_eq!(stage(&p, PARSE), 1, "core's bswap inlined into parse.rs");
        assert_eq!(stage(&p, POLICY), 1, "aya's helper inlined into policy.rs");
        let bswap = &p
            .lines
            .iter()
            .find(|(h, _)| h.file == "uint_macros.rs")
            .unwrap()
            .0;
        assert_eq!(bswap.inlined_into, Some(("parse.rs".into(), 52)));
    }

    #[test]
    fn code_inlined_after_a_pipeline_call_counts_for_the_stage_that_follows() {
        // main.rs calls the counters: aya's lookup wrapper, lb-common's slot function, then
        // count.rs; all three count for the counters, the call's own line for the glue.
        let f = vec![Function {
            start: 0x1000,
            len: 0x100,
        }];
        let l = vec![
            line(0x1000, &format!("{WS}/main.rs"), 139),
            line(0x1010, REG, 10),
            line(0x1020, "/work/main/lb-common/src/lib.rs", 88),
            line(0x1030, &format!("{WS}/count.rs"), 12),
        ];
        let p = attribute(&f, &l, &[at(0x1004), at(0x1014), at(0x1024), at(0x1034)], 1);
        assert_eq!(stage(&p, PIPELINE), 1);
        assert_eq!(stage(&p, COUNTERS), 3);
    }

    #[test]
    fn library_code_opening_a_function_counts_for_its_first_workspace_line() {
        // Not the entry point's policy.rs line before it in address order: another function.
        let (f, l) = program();
        let p = attribute(&f, &l, &[at(f[1].start + 4)], 1);
        assert_eq!(stage(&p, COUNTERS), 1);
        assert_eq!(stage(&p, POLICY), 0);
    }

    #[test]
    fn a_library_only_function_is_named_by_its_library_file() {
        let f = vec![Function {
            start: 0x1000,
            len: 0x10,
        }];
        let l = vec![line(0x1000, REG, 1)];
        let p = attribute(&f, &l, &[at(0x1008)], 1);
        assert_eq!(p.stages, vec![("library: helpers.rs".to_string(), 1)]);
    }

    #[test]
    fn samples_beside_the_program_go_by_kernel_symbol() {
        let (f, l) = program();
        let samples = [
            kernel("htab_map_hash"),
            kernel("__htab_map_lookup_elem"),
            kernel("lookup_nulls_elem_raw"),
            kernel("memcmp"),
            kernel("bpf_lru_pop_free"),
            kernel("trie_lookup_elem"),
            kernel("bpf_fib_lookup"),
            kernel("fib_table_lookup"),
            kernel("bpf_xdp_adjust_head"),
            kernel("bpf_test_run"),
            kernel("bpf_test_timer_continue"),
            kernel("__local_bh_enable_ip"),
            kernel("do_syscall_64"),
            kernel("schedule"),
            Sample {
                ip: 0x5555_0000_1000,
                sym: "lb_bench::dataplane::spin".into(),
            },
        ];
        let p = attribute(&f, &l, &samples, 1);
        assert_eq!(p.in_program, 0);
        assert_eq!(stage(&p, FLOW_TABLE), 5);
        assert_eq!(stage(&p, TRIE), 1);
        assert_eq!(stage(&p, FIB), 2);
        assert_eq!(stage(&p, HELPERS), 1);
        assert_eq!(stage(&p, HARNESS), 4);
        assert_eq!(stage(&p, OTHER), 1);
        assert_eq!(stage(&p, USER), 1);
        let other = p.symbols.iter().find(|(g, _)| g == OTHER).unwrap();
        assert_eq!(other.1, vec![("schedule".to_string(), 1)]);
        let flow = p.symbols.iter().find(|(g, _)| g == FLOW_TABLE).unwrap();
        assert_eq!(flow.1.len(), 5);
        assert_eq!(p.samples, 15);
    }

    #[test]
    fn syscall_entry_is_the_harness_only_with_one_run_per_call() {
        assert_eq!(kernel_group(u64::MAX, "entry_SYSCALL_64", 1), HARNESS);
        assert_eq!(kernel_group(u64::MAX, "_copy_from_user", 1), HARNESS);
        assert_eq!(kernel_group(u64::MAX, "entry_SYSCALL_64", 1000), OTHER);
        assert_eq!(kernel_group(u64::MAX, "bpf_test_run", 1000), HARNESS);
        assert_eq!(kernel_group(u64::MAX, "__bpf_prog_get", 1), HARNESS);
        assert_eq!(kernel_group(u64::MAX, "bpf_test_init.isra.0", 1), HARNESS);
        assert_eq!(kernel_group(u64::MAX, "bpf_dispatcher_xdp", 1000), HARNESS);
        assert_eq!(kernel_group(u64::MAX, "__bpf_prog_get", 1000), HELPERS);
    }

    #[test]
    fn only_jit_symbols_are_other_programs() {
        let prog = "bpf_prog_076ed6a85af5b450_lb_decap";
        assert_eq!(kernel_group(u64::MAX, prog, 1000), OTHER_PROGS);
        assert_eq!(
            kernel_group(u64::MAX, "bpf_prog_put_deferred", 1000),
            HELPERS
        );
    }

    #[test]
    fn workspace_files_map_to_stages() {
        let cases = [
            ("frame.rs", PARSE),
            ("policy.rs", POLICY),
            ("persist.rs", SELECT),
            ("leastconn.rs", SELECT),
            ("csum.rs", REWRITE),
            ("tunnel.rs", REWRITE),
            ("refuse.rs", ICMP),
            ("main.rs", PIPELINE),
            ("decap.rs", "decap.rs"),
        ];
        for (file, want) in cases {
            assert_eq!(stage_of_file(&format!("{WS}/{file}")), want, "{file}");
        }
        assert_eq!(stage_of_file("/work/lb/lb-common/src/flow.rs"), PIPELINE);
        assert_eq!(
            short_name("/work/lb/lb-common/src/lib.rs"),
            "lb-common/lib.rs"
        );
        assert_eq!(short_name(&format!("{WS}/nat.rs")), "nat.rs");
        assert_eq!(short_name(REG), "helpers.rs");
        assert!(is_library(REG) && is_library(CORE) && !is_library(&format!("{WS}/nat.rs")));
    }

    #[test]
    fn a_sample_before_its_functions_first_line_record_is_no_line() {
        let f = vec![Function {
            start: 0x1000,
            len: 0x100,
        }];
        let l = vec![line(0x1010, &format!("{WS}/parse.rs"), 1)];
        let p = attribute(&f, &l, &[at(0x1004), at(0x1010)], 1);
        assert_eq!(stage(&p, NO_LINE), 1);
        assert_eq!(stage(&p, PARSE), 1);
    }
}
