//! End to end: changes made through the CLI are all or nothing, and the ones that take a
//! backend away or check many of them do not break what should keep working: a change
//! whose configuration cannot be saved is refused and not in effect; a backend deleted
//! gracefully keeps its established connections while new ones go elsewhere; many slow
//! health checks do not run the agent out of open files.

use std::{net::SocketAddr, time::Duration};

use lb_tests::e2e::*;

/// The agent's config file made a directory: nothing can be written there. A backend add
/// and a VIP add are refused with a one-line error saying so, and neither is in effect
/// (listed or taking connections); once the file can be written again, the same add works.
#[test]
fn a_change_that_cannot_be_saved_is_refused_and_not_in_effect() {
    let _serial = serial();
    let s = Setup::serving(2, &[1]);
    let vip = vip4().to_string();
    let saved = std::fs::read_to_string(&s.config).unwrap();
    std::fs::remove_file(&s.config).unwrap();
    std::fs::create_dir(&s.config).unwrap();

    let b2 = s.backend(2, false);
    let error = s.lb_fails(&["backend", "add", &vip, &b2]);
    assert!(
        error.contains("not applied") && error.contains(&s.config.display().to_string()),
        "{error}"
    );
    let listed = s.listed_addresses();
    assert_eq!(
        listed,
        [s.backend(1, false)],
        "the refused backend is listed"
    );
    assert_split(&s.requests(vip4(), 10), &[(1, 10)]);

    let other = SocketAddr::new(vip4().ip(), 8080).to_string();
    let error = s.lb_fails(&["vip", "add", &other]);
    assert!(error.contains("not applied"), "{error}");
    assert!(
        !s.lb(&["vip", "list"]).contains(&other),
        "the refused VIP is listed"
    );

    std::fs::remove_dir(&s.config).unwrap();
    std::fs::write(&s.config, saved).unwrap();
    s.lb(&["backend", "add", &vip, &b2]);
    s.wait_all_up();
    assert_split(&s.requests(vip4(), 10), &[(1, 5), (2, 5)]);
    let file = std::fs::read_to_string(&s.config).unwrap();
    assert!(file.contains(&b2), "{file}");
}

/// `lb backend del` of a backend with an established connection: the backend is listed
/// as leaving (and saved so), takes no new connections, and the connection goes on being
/// answered by it; when the grace period is over it is gone. A backend without flows goes
/// at once.
#[test]
fn a_deleted_backend_keeps_its_connections_until_the_grace_ends() {
    let _serial = serial();
    let s = Setup::serving(3, &[1, 2]);
    let (keepalive, kept) =
        s.pinned_keepalive(vip4(), Duration::from_millis(100), Duration::from_secs(30));
    let leaving = index_of(&kept);
    let other = 3 - leaving;
    let vip = vip4().to_string();

    let out = s.lb(&[
        "backend",
        "del",
        &vip,
        &s.backend(leaving, false),
        "--grace",
        "10",
    ]);
    assert!(out.contains("leaving"), "{out}");
    let state_of = |i: usize| {
        s.backend_list()
            .iter()
            .find(|b| field(b, "address") == s.backend(i, false))
            .map(|b| field(b, "state"))
    };
    assert_eq!(state_of(leaving).as_deref(), Some("leaving"));
    let saved = std::fs::read_to_string(&s.config).unwrap();
    assert!(
        saved.contains("leaving_until"),
        "not in the config file:\n{saved}"
    );
    let table = s.lb(&["backend", "list"]);
    assert!(table.contains("leaving"), "{table}");
    assert_split(&s.requests(vip4(), 10), &[(other, 10)]);

    // Its connection is still answered, by it, a while into the grace period.
    let before = keepalive.answers().len();
    keepalive
        .wait_answers(before + 10, Duration::from_secs(3))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let answers = keepalive.stop();
    assert_all_from(&answers, &kept, "in the grace period");
    assert_eq!(state_of(leaving).as_deref(), Some("leaving"));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while state_of(leaving).is_some() {
        assert!(
            std::time::Instant::now() < deadline,
            "still listed 20 s after a 10 s grace: {:?}",
            s.backend_list()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_split(&s.requests(vip4(), 10), &[(other, 10)]);

    // Backend 3 never had a flow: deleted, it goes at once.
    s.lb(&["backend", "add", &vip, &s.backend(3, false)]);
    let out = s.lb(&["backend", "del", &vip, &s.backend(3, false)]);
    assert!(out.contains("removed"), "{out}");
    assert_eq!(state_of(3), None);
}

/// 600 backends that never answer, each checked over TCP with the check's whole timeout
/// in flight, by an agent started with a soft limit of 256 open files: the agent raises
/// it, and no check fails for want of a file descriptor.
#[test]
fn many_slow_checks_do_not_run_out_of_open_files() {
    let _serial = serial();
    let s = {
        let _low = LowOpenFileLimit::set(256);
        Setup::new(1)
    };
    let addrs = s.static_neighbours(600);
    let mut text = String::from(
        "[[vip]]\naddress = \"10.99.1.1:8080\"\n\
         [vip.check]\ncheck = \"tcp\"\ninterval_ms = 1000\ntimeout_ms = 900\nfall = 100\n",
    );
    for a in &addrs {
        text += &format!("[[vip.backend]]\naddress = \"{a}\"\n");
    }
    let file = s.bed.dir().join("slow.toml");
    std::fs::write(&file, &text).unwrap();
    s.lb(&["apply", "-f", &file.to_string_lossy()]);
    // Two rounds of checks.
    std::thread::sleep(Duration::from_millis(2500));
    let list = s.backend_list();
    let checked = list
        .iter()
        .filter(|b| b.get("last_check_detail").is_some_and(|d| !d.is_null()));
    assert!(checked.count() > 500, "the checks did not run");
    let starved: Vec<String> = list
        .iter()
        .filter_map(|b| b.get("last_check_detail")?.as_str().map(str::to_string))
        .filter(|d| d.contains("os error 24") || d.contains("Too many open files"))
        .collect();
    assert!(
        starved.is_empty(),
        "{} checks ran out of open files, e.g. {}",
        starved.len(),
        starved[0]
    );
}

/// Lowers this process's soft limit on open files (children started meanwhile inherit
/// it); puts it back when dropped.
struct LowOpenFileLimit(libc::rlimit);

impl LowOpenFileLimit {
    fn set(soft: u64) -> Self {
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: getrlimit and setrlimit only touch the struct passed, on this stack.
        assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut old) }, 0);
        let low = libc::rlimit {
            rlim_cur: soft,
            rlim_max: old.rlim_max,
        };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &low) }, 0);
        Self(old)
    }
}

impl Drop for LowOpenFileLimit {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &self.0) };
    }
}
