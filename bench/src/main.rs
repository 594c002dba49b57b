//! `lb-bench`: the benchmark runner behind `cargo xtask bench` / `./x.sh bench`.
//!
//! Prints Markdown tables (as BENCHMARKS.md quotes them) and writes them, with the raw
//! figures as JSON, under `target/bench/`.

use std::{path::PathBuf, process::ExitCode, time::Instant};

use anyhow::{Context as _, Result};
use clap::{Parser, ValueEnum};
use lb_bench::{control, dataplane, e2e, flowsync, profile, report};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Part {
    /// Cost per packet under BPF_PROG_TEST_RUN beside trivial programs.
    Dataplane,
    /// Packet rates and HTTP through the namespace test bed, beside HAProxy and nginx.
    E2e,
    /// Applying backends, Maglev tables, change-to-data-plane latency.
    Control,
    /// Flow sharing between balancers: new-flow cost, flows shared per second, delay.
    Flowsync,
}

#[derive(Parser)]
#[command(
    name = "lb-bench",
    about = "Benchmarks of the XDP load balancer (run as root)"
)]
struct Cli {
    /// A short run (fewer rounds and calls, shorter traffic runs): minutes, not tens.
    #[arg(long)]
    quick: bool,
    /// Run only these parts (default: all).
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
    /// Where to write results.md and results.json.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Instead of benchmarking, run one data-plane case ("CASE@CONFIGURATION", names as in
    /// the table) in a loop for --spin-secs, for `perf record -e cpu-clock` to profile.
    #[arg(long, hide = true)]
    spin: Option<String>,
    #[arg(long, default_value_t = 10.0, hide = true)]
    spin_secs: f64,
    /// Runs per BPF_PROG_TEST_RUN call while spinning or profiling: above 1 only for a
    /// case whose rewritten frame takes the same path again (an established flow, a drop,
    /// a pass), so the program's share of the profile is not buried under the syscall's.
    #[arg(long, default_value_t = 1)]
    spin_repeat: u32,
    /// Instead of benchmarking, profile one data-plane case ("CASE@CONFIGURATION", names as
    /// in the table) with `perf record -e cpu-clock`: where its time goes, stage by stage
    /// and source line by source line. Prints the table and writes <out>/profile.md.
    #[arg(long)]
    profile: Option<String>,
    /// How long --profile spins the case.
    #[arg(long, default_value_t = 5.0)]
    profile_secs: f64,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    if let Some(spin) = &cli.spin {
        let (case, config) = spin
            .split_once('@')
            .context("--spin takes CASE@CONFIGURATION")?;
        let spun = dataplane::spin(case, config, cli.spin_secs, cli.spin_repeat, &mut |_, _| {
            Ok(())
        })?;
        eprintln!("{} runs", spun.runs);
        return Ok(());
    }
    if let Some(case) = &cli.profile {
        let (case, config) = case
            .split_once('@')
            .context("--profile takes CASE@CONFIGURATION")?;
        let md = profile::run(&profile::Options {
            case: case.into(),
            config: config.into(),
            secs: cli.profile_secs,
            repeat: cli.spin_repeat,
            out: cli.out.clone(),
        })?;
        println!("{md}");
        eprintln!("written to {}", cli.out.join("profile.md").display());
        return Ok(());
    }
    let wants = |p: Part| cli.only.is_empty() || cli.only.contains(&p);
    let started = Instant::now();
    let mut progress = |msg: &str| {
        eprintln!("[{:>6.1}s] {msg}", started.elapsed().as_secs_f64());
    };
    let mut md = String::new();
    let mut json = serde_json::Map::new();
    md.push_str(&format!(
        "# lb-bench results ({} run)\n\n{}\n",
        if cli.quick { "quick" } else { "full" },
        machine_notes()
    ));

    if wants(Part::Dataplane) {
        let opts = if cli.quick {
            dataplane::Options::quick()
        } else {
            dataplane::Options::full()
        };
        let r = dataplane::run(&opts, &mut progress)?;
        md.push_str(&format!(
            "\n## Data plane, ns per packet (BPF_PROG_TEST_RUN, {} calls x {} rounds)\n\n{}",
            opts.calls,
            opts.rounds,
            report::dataplane(&r)
        ));
        json.insert("dataplane".into(), serde_json::to_value(&r)?);
    }

    if wants(Part::E2e) {
        let opts = if cli.quick {
            e2e::Options::quick()
        } else {
            e2e::Options::full()
        };
        let r = e2e::run(&opts, &mut progress)?;
        md.push_str(&format!(
            "\n## End to end in the namespace test bed\n\n{}",
            report::e2e(&r)
        ));
        json.insert("e2e".into(), serde_json::to_value(&r)?);
    }

    if wants(Part::Control) {
        let opts = if cli.quick {
            control::Options::quick()
        } else {
            control::Options::full()
        };
        let r = control::run(&opts, &mut progress)?;
        md.push_str(&format!("\n## Control plane\n\n{}", report::control(&r)));
        json.insert("control".into(), serde_json::to_value(&r)?);
    }

    if wants(Part::Flowsync) {
        let opts = if cli.quick {
            flowsync::Options::quick()
        } else {
            flowsync::Options::full()
        };
        let r = flowsync::run(&opts, &mut progress)?;
        md.push_str(&format!(
            "\n## Flow sharing ({} calls x {} rounds; {} new flows a round)\n\n{}",
            opts.calls,
            opts.rounds,
            opts.flows,
            flowsync::markdown(&r)
        ));
        json.insert("flowsync".into(), serde_json::to_value(&r)?);
    }

    println!("{md}");
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    std::fs::write(cli.out.join("results.md"), &md)?;
    std::fs::write(
        cli.out.join("results.json"),
        serde_json::to_string_pretty(&json)?,
    )?;
    progress(&format!(
        "done; results in {}/results.{{md,json}}",
        cli.out.display()
    ));
    Ok(())
}

/// Kernel, CPUs and date, for the record.
fn machine_notes() -> String {
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let date = std::process::Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!(
        "{date}; kernel {}; {cpus} CPUs ({cpu}); shared machine: figures are ratios to \
         baselines measured in the same run.",
        kernel.trim()
    )
}
