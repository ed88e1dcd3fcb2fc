//! Repair before power-cycle with real processes (issue "Recovery when the BMC is gone"):
//! `serve` with `[recovery] repair_key`, node-a's guard (`test:///` libvirt), and a real
//! `sshd` in a network namespace at node-a's address whose `authorized_keys` forces the
//! provisioner's key to `nodekeeper-guard repair` — restart libvirtd (none here) and the guard
//! (`guard_restart`: a script that replaces the guard process). node-b and node-c are heard
//! through heartbeats this test writes.
//!
//! 1. node-a's guard hangs (SIGSTOP): suspect; node-a still answers on port 22, so the fence
//!    repairs first; the repaired guard heartbeats; the fence is called off, nothing moved.
//! 2. It hangs again, and this time the repair brings nothing back (the restart does
//!    nothing): after `repair_wait` the fence goes on — powered off through its BMC, its HA
//!    instance moved.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

mod common;

use common::{
    free_port, guard_binary, heartbeats, netns_available, serve_config, spawn_serve, test_domain_xml, wait_until,
    KillOnDrop,
};
use nodekeeper_store::testing::host_name as n;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{
    EventFilter, Generation, HostState, InstanceId, NewHost, NewInstance, OperationStatus, Storage,
};

/// node-a's machine: a namespace with `eth0` at 10.88.X.2, a veth to the root namespace
/// (10.88.X.1); removed on drop, with the processes recorded in `pids`.
struct Node {
    ns: String,
    link: String,
    pids: Vec<String>,
}

impl Drop for Node {
    fn drop(&mut self) {
        for pidfile in &self.pids {
            if let Ok(pid) = std::fs::read_to_string(pidfile) {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
        }
        let _ = Command::new("ip").args(["link", "del", &self.link]).status();
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip");
    assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_suspect_host_that_answers_is_repaired_over_ssh_before_it_is_power_cycled() {
    if !netns_available() {
        return;
    }
    let have = std::path::Path::new("/usr/sbin/sshd").exists()
        && Command::new("ssh").arg("-V").output().is_ok_and(|o| o.status.success());
    assert!(have || std::env::var("NODEKEEPER_REQUIRE_NETNS").as_deref() != Ok("1"), "sshd (openssh-server) and ssh");
    if !have {
        return;
    }
    let db = TestDb::sqlite();
    let store = db.store().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display().to_string();
    let x = std::process::id() % 200 + 20;
    let (ns, link) = (format!("nkrep{}", std::process::id()), format!("nkr{}", std::process::id()));
    let mut node = Node { ns: ns.clone(), link: link.clone(), pids: Vec::new() };
    ip(&["netns", "add", &ns]);
    ip(&["link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &ns]);
    ip(&["addr", "add", &format!("10.88.{x}.1/24"), "dev", &link]);
    ip(&["link", "set", &link, "up"]);
    ip(&["-n", &ns, "addr", "add", &format!("10.88.{x}.2/24"), "dev", "eth0"]);
    ip(&["-n", &ns, "link", "set", "eth0", "up"]);
    ip(&["-n", &ns, "link", "set", "lo", "up"]);
    let node_ip = format!("10.88.{x}.2");

    // The provisioner's repair key, and node-a's sshd with it forced to `guard repair`.
    let key = format!("{d}/repair_key");
    let out = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f", &key]).output().expect("keygen");
    assert!(out.status.success(), "{out:?}");
    let host_key = format!("{d}/host_key");
    let out =
        Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f", &host_key]).output().expect("keygen");
    assert!(out.status.success(), "{out:?}");
    let public = std::fs::read_to_string(format!("{key}.pub")).expect("public key");
    let guard = guard_binary();
    let guard_config = format!("{d}/node-a.toml");
    let restart = format!("{d}/restart-guard.sh");
    let pidfile = format!("{d}/guard.pid");
    node.pids.push(pidfile.clone());
    std::fs::write(
        format!("{d}/authorized_keys"),
        format!("restrict,command=\"{guard} repair --config {guard_config}\" {public}"),
    )
    .expect("authorized_keys");
    std::fs::create_dir_all("/run/sshd").expect("/run/sshd");
    let sshd_config = format!("{d}/sshd_config");
    std::fs::write(
        &sshd_config,
        format!(
            "ListenAddress {node_ip}\nPort 22\nHostKey {host_key}\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n\
             UsePAM no\nStrictModes no\nPidFile {d}/sshd.pid\n"
        ),
    )
    .expect("sshd_config");
    node.pids.push(format!("{d}/sshd.pid"));
    let sshd = Command::new("ip")
        .args(["netns", "exec", &ns, "/usr/sbin/sshd", "-D", "-e", "-f", &sshd_config])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(format!("{d}/sshd.log")).expect("log"))
        .spawn()
        .expect("sshd");
    let _sshd = KillOnDrop(sshd);

    // node-a's guard; its restart (what `guard repair` runs last) replaces the process, unless
    // `restart.off` exists (the second part: a repair that brings nothing back).
    std::fs::write(
        &guard_config,
        format!(
            "host = \"node-a\"\ndatabase_url = \"{}\"\n[libvirt]\nconfig_dir = \"{d}/qemu\"\nuri = \"test:///default\"\n\
             [boot]\nstate_dir = \"{d}/state\"\ndb_wait = \"1s\"\n[watch]\nheartbeat_interval = \"1s\"\n\
             converge_interval = \"1s\"\nisolation_timeout = \"4s\"\nmax_restarts = 0\nlibvirt_restart = []\n\
             peer_listen = \"off\"\nguard_restart = [\"{restart}\"]\n",
            db.url()
        ),
    )
    .expect("guard config");
    std::fs::write(
        &restart,
        format!(
            "#!/bin/sh\n[ -e {d}/restart.off ] && exit 0\nkill -KILL $(cat {pidfile}) 2>/dev/null\n\
             setsid sh -c 'echo $$ > {pidfile}; exec {guard} watch --config {guard_config} >> {d}/guard.log 2>&1' \
             < /dev/null > /dev/null 2>&1 &\nsleep 0.2\n"
        ),
    )
    .expect("restart script");
    std::fs::set_permissions(&restart, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");

    // The cell: node-a at its address, with a BMC; node-b and node-c, heard through this test.
    let bmc_off = Arc::new(AtomicBool::new(false));
    let off = bmc_off.clone();
    let app = axum::Router::new()
        .route(
            "/redfish/v1/Systems/{id}",
            axum::routing::get(move || {
                let off = off.clone();
                async move {
                    axum::Json(serde_json::json!({"PowerState": if off.load(Ordering::SeqCst) { "Off" } else { "On" }}))
                }
            }),
        )
        .route(
            "/redfish/v1/Systems/{id}/Actions/ComputerSystem.Reset",
            axum::routing::post({
                let off = bmc_off.clone();
                move |axum::Json(body): axum::Json<serde_json::Value>| {
                    let off = off.clone();
                    async move {
                        off.store(body["ResetType"] == "ForceOff", Ordering::SeqCst);
                        axum::http::StatusCode::NO_CONTENT
                    }
                }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let bmc_port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    for (h, ip) in [("node-a", Some(node_ip.as_str())), ("node-b", None), ("node-c", None)] {
        let bmc = format!("redfish+http://127.0.0.1:{bmc_port}/redfish/v1/Systems/{h}");
        let new = NewHost {
            name: n(h),
            mac: None,
            ip: ip.map(|i| i.parse().expect("ip")),
            bmc_url: Some(bmc),
            bmc_credentials: None,
        };
        store.add_host(&new, "test").await.expect("host");
    }
    let uuid = InstanceId::random();
    let item = NewInstance {
        uuid,
        name: "vm-ha".into(),
        owner: n("node-a"),
        ha: true,
        storage: Storage::Shared,
        generation: Generation(1),
        domain_xml: Some(test_domain_xml("vm-ha", uuid)),
    };
    store.import_instances(&[item], "test").await.expect("import");
    let beats = heartbeats(&store, &["node-b", "node-c"], Duration::from_millis(500));
    assert!(Command::new(&restart).status().expect("start the guard").success());
    wait_until("node-a heartbeats", Duration::from_secs(30), async || {
        store.require_host(&n("node-a")).await.expect("a").last_heartbeat.is_some()
    })
    .await;

    let http = free_port();
    let (config, _) = serve_config(
        &d,
        "provisioner",
        db.url(),
        http,
        &format!(
            "[recovery]\ngrace = \"6s\"\ninterval = \"1s\"\nlease_ttl = \"5s\"\nafter_fence = \"nothing\"\n\
             repair_key = \"{key}\"\nrepair_wait = \"8s\"\n"
        ),
    );
    let _serve = spawn_serve(&config, &format!("{d}/serve.log"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let hang = || {
        let pid = std::fs::read_to_string(&pidfile).expect("guard pid");
        assert!(Command::new("kill").args(["-STOP", pid.trim()]).status().is_ok_and(|s| s.success()));
    };
    let events = |store: nodekeeper_store::Store| async move {
        store
            .events(&EventFilter { host: Some(n("node-a")), limit: Some(1000), ..Default::default() })
            .await
            .expect("events")
    };
    let logs = || {
        format!(
            "serve:\n{}\nsshd:\n{}\nguard:\n{}",
            std::fs::read_to_string(format!("{d}/serve.log")).unwrap_or_default(),
            std::fs::read_to_string(format!("{d}/sshd.log")).unwrap_or_default(),
            std::fs::read_to_string(format!("{d}/guard.log")).unwrap_or_default()
        )
    };

    // 1. It hangs; the repair brings it back: the fence is called off.
    hang();
    let mut suspect_at = None;
    let started = Instant::now();
    let first = loop {
        assert!(started.elapsed() < Duration::from_secs(60), "no repair\n{}", logs());
        if suspect_at.is_none() && store.require_host(&n("node-a")).await.expect("a").state == HostState::Suspect {
            suspect_at = Some(Instant::now());
        }
        match store.latest_operation(&n("node-a")).await.expect("op") {
            Some(op) if op.status != OperationStatus::Running => break op,
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let repaired_in = suspect_at.map(|t| t.elapsed()).unwrap_or_default();
    assert_eq!((first.status, first.step.as_str()), (OperationStatus::Done, "aborted"), "{first:?}\n{}", logs());
    let said = events(store.clone()).await;
    let repair = said.iter().find(|e| e.message.contains("repaired over SSH")).expect("the repair's event");
    assert!(
        repair.message.contains("guard restarted") && repair.message.contains("libvirt answers"),
        "{}",
        repair.message
    );
    assert!(said.iter().any(|e| e.message.contains("heartbeats again after its repair")), "{said:?}");
    assert_eq!(store.require_host(&n("node-a")).await.expect("a").state, HostState::Active);
    assert!(!bmc_off.load(Ordering::SeqCst), "never powered off");
    let i = store.instance(uuid).await.expect("get").expect("instance");
    assert_eq!((i.owner.as_str(), i.generation), ("node-a", Generation(1)));

    // 2. It hangs again; the repair runs but brings nothing back: after repair_wait, the fence
    // powers it off and moves its HA instance.
    std::fs::write(format!("{d}/restart.off"), "").expect("flag");
    tokio::time::sleep(Duration::from_secs(2)).await;
    hang();
    wait_until("the second fence done", Duration::from_secs(90), async || {
        store
            .latest_operation(&n("node-a"))
            .await
            .expect("op")
            .is_some_and(|o| o.id != first.id && o.status != OperationStatus::Running)
    })
    .await;
    let second = store.latest_operation(&n("node-a")).await.expect("op").expect("fence");
    assert_eq!((second.status, second.step.as_str()), (OperationStatus::Done, "done"), "{second:?}\n{}", logs());
    let said = events(store.clone()).await;
    assert!(said.iter().any(|e| e.message.contains("no heartbeat within the repair's wait")), "{said:?}");
    assert!(bmc_off.load(Ordering::SeqCst), "powered off through the BMC");
    let i = store.instance(uuid).await.expect("get").expect("instance");
    assert!(i.owner != n("node-a") && i.generation == Generation(2), "{i:?}");
    eprintln!("repair: from suspect to the fence called off: {repaired_in:?} (grace 6 s, 1 s heartbeats)");
    beats.abort();
    drop(node);
}
