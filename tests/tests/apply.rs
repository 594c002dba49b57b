//! End to end: `lb apply -f FILE` (and `--diff`, and SIGHUP) against a running agent in a
//! namespace test bed. The configuration in the file becomes the running state as one
//! change; what did not change is not disturbed; a bad file changes nothing.

use std::{net::IpAddr, time::Duration};

use lb_tests::e2e::*;
use xtask::traffic::Answer;

/// The agent's config file text for `vip4()` with the given backends (1-based).
fn file_with(s: &Setup, backends: &[usize]) -> String {
    let mut text = format!("[[vip]]\naddress = \"{}\"\nproto = \"tcp\"\n", vip4());
    for &i in backends {
        text += &format!("\n[[vip.backend]]\naddress = \"{}\"\n", s.backend(i, false));
    }
    text
}

/// Backends 1 and 2 run with a keep-alive connection on one of them; the file keeps that
/// one, drops the other and adds backend 3. `--diff` says so and changes nothing; `apply`
/// does it, the kept backend keeps its connection and its counters (its id), and the agent's
/// own config file follows. A SIGHUP then re-applies that file after an edit.
#[test]
fn apply_changes_only_the_difference() {
    let _serial = serial();
    let s = Setup::serving(3, &[1, 2]);
    let (keepalive, kept) =
        s.pinned_keepalive(vip4(), Duration::from_millis(100), Duration::from_secs(30));
    let kept = index_of(&kept);
    let gone = 3 - kept;
    s.requests(vip4(), 20);
    let flows_before = |list: &[serde_json::Value]| {
        list.iter()
            .find(|b| field(b, "address") == s.backend(kept, false))
            .map(|b| number(b, "new_flows"))
            .expect("kept backend listed")
    };
    let before = flows_before(&s.backend_list());

    let file = s.bed.dir().join("wanted.toml");
    std::fs::write(&file, file_with(&s, &[kept, 3])).unwrap();
    let f = file.to_string_lossy().into_owned();
    let diff = s.lb(&["apply", "-f", &f, "--diff"]);
    assert!(
        diff.contains(&format!("- backend {}", s.backend(gone, false)))
            && diff.contains(&format!("+ backend {}", s.backend(3, false)))
            && diff.contains("1 added, 0 changed, 1 removed"),
        "{diff}"
    );
    assert!(
        !diff.contains(&s.backend(kept, false)),
        "the kept backend is no change: {diff}"
    );
    assert_eq!(s.backend_list().len(), 2, "--diff applies nothing");

    let out = s.lb(&["apply", "-f", &f]);
    assert!(
        out.contains("applied: 1 added, 0 changed, 1 removed"),
        "{out}"
    );
    s.wait_all_up();
    let list = s.backend_list();
    let addrs: Vec<String> = list.iter().map(|b| field(b, "address")).collect();
    assert_eq!(addrs, [s.backend(kept, false), s.backend(3, false)]);
    assert!(
        flows_before(&list) >= before,
        "the kept backend's counters were reset: its id changed"
    );
    let tally = s.requests(vip4(), 20);
    assert_split(&tally, &[(kept, 10), (3, 10)]);
    let answers = keepalive.stop();
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Answer::Ok { backend, .. } if *backend == name(kept))),
        "the keep-alive connection left its backend or failed: {answers:?}"
    );
    let saved = std::fs::read_to_string(&s.config).unwrap();
    assert!(
        saved.contains(&s.backend(3, false)) && !saved.contains(&s.backend(gone, false)),
        "the agent's config file:\n{saved}"
    );

    // An edit of the agent's own file, then SIGHUP: backend 3 goes.
    std::fs::write(&s.config, file_with(&s, &[kept])).unwrap();
    s.agent_signal(libc::SIGHUP);
    wait_backends(&s.bed, &s.socket, "backend 3 removed by SIGHUP", |list| {
        list.len() == 1 && field(&list[0], "address") == s.backend(kept, false)
    });
}

/// A file with 10,000 on-link backends is applied as one change; a file with a mistake in
/// it is refused with its name and line, and nothing of it is applied.
#[test]
fn apply_of_ten_thousand_backends_and_of_a_bad_file() {
    let _serial = serial();
    let s = Setup::new(1);
    let addrs: Vec<IpAddr> = s.static_neighbours(10_000);
    let vip = "10.99.1.1:8080";
    let mut text = format!("[[vip]]\naddress = \"{vip}\"\n");
    for a in &addrs {
        text += &format!("[[vip.backend]]\naddress = \"{a}\"\n");
    }
    let file = s.bed.dir().join("big.toml");
    std::fs::write(&file, &text).unwrap();
    let f = file.to_string_lossy().into_owned();
    let out = s.lb(&["apply", "-f", &f]);
    assert!(
        out.contains("applied: 10001 added, 0 changed, 0 removed"),
        "{out}"
    );
    let list = s.backend_list();
    assert_eq!(list.len(), 10_000);
    assert!(
        list.iter().all(|b| field(b, "state") == "up"),
        "every backend resolved and up: {:?}",
        list.iter().find(|b| field(b, "state") != "up")
    );

    // The same file again: nothing to do.
    let again = s.lb(&["apply", "-f", &f]);
    assert!(again.contains("0 added, 0 changed, 0 removed"), "{again}");

    // One backend listed twice (the second time on line 6); applied, the file would also
    // remove 9,999 backends.
    let bad = format!(
        "[[vip]]\naddress = \"{vip}\"\n[[vip.backend]]\naddress = \"{}\"\n[[vip.backend]]\n\
         address = \"{}\"\n",
        addrs[0], addrs[0]
    );
    let bad_file = s.bed.dir().join("bad.toml");
    std::fs::write(&bad_file, bad).unwrap();
    let b = bad_file.to_string_lossy().into_owned();
    let err = s.lb_fails(&["apply", "-f", &b]);
    assert!(
        err.contains("bad.toml: line 6") && err.contains("listed twice"),
        "{err}"
    );
    assert_eq!(
        s.backend_list().len(),
        10_000,
        "nothing of the bad file applied"
    );
}
