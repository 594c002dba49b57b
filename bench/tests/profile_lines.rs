//! `lb-bench --profile` without perf: the loaded program's JIT line info and BTF, read from
//! the kernel, must place an address in the program's own source files, stage by stage.
//! Needs root, like the data-plane fixture tests.

use std::os::fd::AsFd as _;

use lb_bench::profile::{self, Program, Sample};
use lb_tests::fixtures::Fixture;

#[test]
fn the_loaded_programs_line_records_name_its_stages() {
    let mut fx = Fixture::new();
    let prog = fx.dp.program_fd().expect("the program's fd");
    let p = Program::read(prog.as_fd()).unwrap_or_else(|e| panic!("{e:#} (run as root)"));
    assert!(!p.functions.is_empty() && !p.lines.is_empty());
    for l in &p.lines {
        assert!(
            p.functions
                .iter()
                .any(|f| l.addr >= f.start && l.addr < f.start + u64::from(f.len)),
            "line record at {:#x} ({}:{}) outside every function",
            l.addr,
            l.file,
            l.line
        );
    }
    // One sample at the start of every line record: each workspace file's records count for
    // its stage, and every stage of the forwarding path shows up.
    let samples: Vec<Sample> = p
        .lines
        .iter()
        .map(|l| Sample {
            ip: l.addr,
            sym: String::new(),
        })
        .collect();
    let profile = profile::attribute(&p.functions, &p.lines, &samples, 1);
    assert_eq!(profile.in_program, samples.len() as u64);
    let stages: Vec<&str> = profile.stages.iter().map(|(s, _)| s.as_str()).collect();
    for want in [
        profile::PARSE,
        profile::POLICY,
        profile::SELECT,
        profile::REWRITE,
        profile::COUNTERS,
        profile::PIPELINE,
    ] {
        assert!(stages.contains(&want), "no {want:?} among {stages:?}");
    }
    let parse = p
        .lines
        .iter()
        .find(|l| l.file.ends_with("/parse.rs"))
        .expect("a line record in parse.rs");
    assert!(
        !parse.source.is_empty(),
        "parse.rs:{} has no source text",
        parse.line
    );
    assert!(p.size_note.starts_with("program: "), "{}", p.size_note);
}
