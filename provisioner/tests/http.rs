//! The HTTP server with real clients (curl): iPXE scripts per host state, images with Range
//! and a sha256 ETag, refusals of paths that leave the images directory, health, metrics, API.

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use nodekeeper_provisioner::http::{self, images::Images, HttpState};
use nodekeeper_provisioner::metrics::Metrics;
use nodekeeper_provisioner::serve::config::HttpConfig;
use nodekeeper_store::testing::TestDb;
use nodekeeper_store::{HostName, HostState, NewHost, Store};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

struct Server {
    base: String,
    store: Store,
    dir: tempfile::TempDir,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _db: TestDb,
}

async fn start() -> Server {
    let db = TestDb::sqlite();
    let store = db.store().await;
    for (name, mac) in [("node-a", "52:54:00:00:00:0a"), ("node-b", "52:54:00:00:00:0b")] {
        let h = NewHost {
            name: name.parse().expect("name"),
            mac: Some(mac.parse().expect("mac")),
            ip: None,
            bmc_url: None,
            bmc_credentials: None,
        };
        store.add_host(&h, "test").await.expect("host");
    }
    store.set_host_state(&host("node-a"), HostState::Reimaging, "test", "reimage").await.expect("state");
    // node-a's reimage has powered it on: it waits for the agent.
    let data = nodekeeper_provisioner::reimage::machine::ReimageData::first_boot("node.img");
    let data = serde_json::to_string(&data).expect("json");
    store.start_operation("reimage", &host("node-a"), "agent_booted", None, &data, "test").await.expect("reimage");
    let dir = tempfile::tempdir().expect("dir");
    let images_dir = dir.path().join("images");
    std::fs::create_dir_all(images_dir.join("deploy")).expect("mkdir");
    let loaders_dir = dir.path().join("tftp");
    std::fs::create_dir_all(&loaders_dir).expect("mkdir");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let base = format!("http://{}", listener.local_addr().expect("addr"));
    let config = HttpConfig {
        listen: listener.local_addr().expect("addr"),
        public_url: base.clone(),
        images_dir: images_dir.clone(),
        deploy_kernel: "deploy/vmlinuz".into(),
        deploy_initrd: "deploy/initrd.img".into(),
        deploy_kernel_args: "console=ttyS0".into(),
        repair_public_key: None,
        max_event_streams: 4,
        tls: None,
        // The reads of the API as before admin tokens (tests/admin_api.rs has the default).
        auth: nodekeeper_provisioner::config::AuthConfig {
            reads: nodekeeper_provisioner::config::ReadAccess::Open,
            ..Default::default()
        },
    };
    let state = HttpState {
        store: store.clone(),
        config: Arc::new(config),
        metrics: Arc::new(Metrics::default()),
        health: Default::default(),
        guard_store: store.clone(),
        guard_writes: nodekeeper_provisioner::http::guard_writes::GuardWrites::start(
            store.clone(),
            std::time::Duration::from_secs(60),
        ),
        streams: Default::default(),
        tls: None,
        loaders: Some(loaders_dir.clone()),
        media: None,
        bmc: Default::default(),
        images: Arc::new(Images::new(&images_dir).expect("images")),
    };
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(http::serve(listener, state, shutdown.clone()));
    Server { base, store, dir, shutdown, task, _db: db }
}

fn host(name: &str) -> HostName {
    name.parse().expect("host")
}

/// Runs curl; returns (status code, headers, body).
async fn curl(args: &[&str]) -> (u16, String, Vec<u8>) {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let dir = tempfile::tempdir().expect("dir");
        let headers = dir.path().join("h");
        let out = Command::new("curl")
            .args(["-sS", "--path-as-is", "-o", "-", "-D"])
            .arg(&headers)
            .args(["-w", "", "--max-time", "20"])
            .args(&args)
            .output()
            .expect("run curl");
        assert!(out.status.success(), "curl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        let h = std::fs::read_to_string(&headers).expect("headers");
        let code = h.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("status line");
        (code, h.to_ascii_lowercase(), out.stdout)
    })
    .await
    .expect("curl task")
}

fn header<'a>(headers: &'a str, name: &str) -> Option<&'a str> {
    headers.lines().find_map(|l| l.strip_prefix(&format!("{name}: "))).map(str::trim)
}

#[tokio::test]
async fn ipxe_scripts_follow_the_host_state() {
    let s = start().await;
    let (code, _, body) = curl(&[&format!("{}/boot/52:54:00:00:00:0a.ipxe", s.base)]).await;
    let script = String::from_utf8(body).expect("utf-8");
    assert_eq!(code, 200, "{script}");
    assert!(script.starts_with("#!ipxe\n") && script.contains("nk.host=node-a"), "{script}");
    let token = script.split("nk.token=").nth(1).and_then(|r| r.split_whitespace().next()).expect("token");
    let hash = format!("{:x}", Sha256::digest(token.as_bytes()));
    assert!(
        s.store.check_deploy_token(&host("node-a"), &hash, false).await.expect("check"),
        "the token is the stored one"
    );
    // A second fetch in the same boot gets no token; the first still works.
    let (_, _, again) = curl(&[&format!("{}/boot/52-54-00-00-00-0A.ipxe", s.base)]).await;
    let again = String::from_utf8_lossy(&again);
    assert!(!again.contains("nk.token=") && again.contains("exit 1"), "{again}");
    assert!(s.store.check_deploy_token(&host("node-a"), &hash, false).await.expect("check"));

    let (code, _, body) = curl(&[&format!("{}/boot/52:54:00:00:00:0b.ipxe", s.base)]).await;
    assert_eq!(code, 200);
    assert!(
        String::from_utf8_lossy(&body).contains("sanboot --no-describe --drive 0x80"),
        "an active host boots its disk"
    );
    let (code, _, _) = curl(&[&format!("{}/boot/52:54:00:00:00:ff.ipxe", s.base)]).await;
    assert_eq!(code, 404, "unknown MAC");
    let (code, _, _) = curl(&[&format!("{}/boot/not-a-mac.ipxe", s.base)]).await;
    assert_eq!(code, 404);
}

#[tokio::test]
async fn images_have_range_etag_and_stay_inside_their_directory() {
    let s = start().await;
    let images = s.dir.path().join("images");
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    std::fs::write(images.join("node.img"), &data).expect("write image");
    std::fs::write(s.dir.path().join("secret"), b"outside").expect("write secret");
    std::os::unix::fs::symlink(s.dir.path().join("secret"), images.join("escape")).expect("link");
    let sha = format!("{:x}", Sha256::digest(&data));
    let url = format!("{}/images/node.img", s.base);

    let (code, headers, body) = curl(&[&url]).await;
    assert_eq!(code, 200);
    assert_eq!(format!("{:x}", Sha256::digest(&body)), sha, "bytes equal");
    assert_eq!(header(&headers, "etag"), Some(format!("\"{sha}\"").as_str()));
    assert_eq!(header(&headers, "content-length"), Some("3000000"));

    let (code, headers, body) = curl(&["-r", "1000-1999", &url]).await;
    assert_eq!(code, 206);
    assert_eq!(body, &data[1000..2000]);
    assert_eq!(header(&headers, "content-range"), Some("bytes 1000-1999/3000000"));
    let (code, _, body) = curl(&["-r", "2999990-", &url]).await;
    assert_eq!((code, body.as_slice()), (206, &data[2_999_990..]));

    let (code, _, body) = curl(&["-H", &format!("If-None-Match: \"{sha}\""), &url]).await;
    assert_eq!((code, body.len()), (304, 0));
    // HEAD: curl -I prints the headers on stdout; nothing follows them.
    let (code, headers, body) = curl(&["-I", &url]).await;
    assert_eq!((code, String::from_utf8_lossy(&body).to_ascii_lowercase()), (200, headers.clone()));
    assert_eq!(header(&headers, "content-length"), Some("3000000"));

    for bad in [
        "/images/../secret",
        "/images/escape",
        "/images/%2e%2e/secret",
        "/images/.sha256/node.img",
        "/images/deploy",
        "/images/nope.img",
    ] {
        let (code, _, body) = curl(&[&format!("{}{bad}", s.base)]).await;
        assert_eq!(code, 404, "{bad}: {}", String::from_utf8_lossy(&body));
        assert!(!String::from_utf8_lossy(&body).contains("outside"));
    }
}

#[tokio::test]
async fn boot_loaders_are_served_for_uefi_http_boot_from_the_tftp_root_only() {
    let s = start().await;
    let loaders = s.dir.path().join("tftp");
    let efi: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(loaders.join("ipxe.efi"), &efi).expect("write loader");
    std::fs::write(s.dir.path().join("images/node.img"), b"an image").expect("write image");
    let url = format!("{}/boot/loaders/ipxe.efi", s.base);
    let (code, headers, body) = curl(&[&url]).await;
    assert_eq!((code, body.len()), (200, efi.len()));
    assert_eq!(body, efi);
    assert_eq!(header(&headers, "content-length"), Some("200000"));
    // Firmware HTTP boot clients ask for the size first (HEAD) and may fetch in ranges.
    let (code, headers, _) = curl(&["-I", &url]).await;
    assert_eq!((code, header(&headers, "content-length")), (200, Some("200000")));
    let (code, _, body) = curl(&["-r", "100-199", &url]).await;
    assert_eq!((code, body.as_slice()), (206, &efi[100..200]));
    // shim, loaded over HTTP, asks for its second stage at `DIR//grubx64.efi`.
    let (code, _, body) = curl(&[&format!("{}/boot/loaders//ipxe.efi", s.base)]).await;
    assert_eq!((code, body.len()), (200, efi.len()), "a doubled slash");
    let (code, _, _) = curl(&[&format!("{}/boot/loaders/%5Cipxe.efi", s.base)]).await;
    assert_eq!(code, 200, "a backslash");
    for bad in ["/boot/loaders/../images/node.img", "/boot/loaders/%2e%2e/images/node.img", "/boot/loaders/nope.efi"] {
        let (code, _, _) = curl(&[&format!("{}{bad}", s.base)]).await;
        assert_eq!(code, 404, "{bad}");
    }
}

#[tokio::test]
async fn health_metrics_api_and_clean_shutdown() {
    let s = start().await;
    let (code, _, body) = curl(&[&format!("{}/healthz", s.base)]).await;
    assert_eq!((code, body.as_slice()), (200, b"ok\n".as_slice()));
    let (code, _, body) = curl(&[&format!("{}/api/v1/hosts", s.base)]).await;
    assert_eq!(code, 200);
    let hosts: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(hosts[0]["name"], "node-a");
    assert_eq!(hosts[0]["state"], "reimaging");
    let (code, _, _) = curl(&[&format!("{}/api/v1/hosts/node-z", s.base)]).await;
    assert_eq!(code, 404);
    let (code, _, body) = curl(&[&format!("{}/api/v1/events?host=node-a", s.base)]).await;
    assert_eq!(code, 200);
    assert!(String::from_utf8_lossy(&body).contains("host.state"));
    let (code, _, body) = curl(&[&format!("{}/metrics", s.base)]).await;
    let text = String::from_utf8(body).expect("utf-8");
    assert_eq!(code, 200);
    assert!(text.contains("nodekeeper_http_requests_total{route=\"/healthz\",code=\"200\"} 1"), "{text}");
    assert!(text.contains("nodekeeper_http_requests_total{route=\"/api/v1/hosts/{name}\",code=\"404\"} 1"), "{text}");
    assert!(text.contains("# TYPE nodekeeper_dhcp_offers_total counter"));

    s.shutdown.cancel();
    let ended = tokio::time::timeout(std::time::Duration::from_secs(5), s.task).await;
    assert!(matches!(ended, Ok(Ok(Ok(())))), "the server stops when told: {ended:?}");
    let refused =
        Command::new("curl").args(["-sS", "--max-time", "5", &format!("{}/healthz", s.base)]).output().expect("curl");
    assert!(!refused.status.success(), "nothing listens after shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_stream_sends_every_event_once_in_order_and_resumes() {
    let s = start().await;
    let url = format!("{}/api/v1/events/stream?after=0", s.base);
    // A follower that reads for 3 s while an event is recorded in the middle.
    let follower = {
        let url = url.clone();
        tokio::task::spawn_blocking(move || {
            Command::new("curl").args(["-sN", "--max-time", "3", &url]).output().expect("curl").stdout
        })
    };
    tokio::time::sleep(Duration::from_millis(1200)).await;
    s.store
        .record_event(&nodekeeper_store::NewEvent::host("test", "test.live", &host("node-a"), "while streaming".into()))
        .await
        .expect("event");
    let body = String::from_utf8(follower.await.expect("follower")).expect("utf-8");
    let ids: Vec<i64> = body.lines().filter_map(|l| l.strip_prefix("id: ")).map(|v| v.parse().expect("id")).collect();
    let all = s.store.events_after(0, None, 1000).await.expect("events");
    assert_eq!(ids, all.iter().map(|e| e.id).collect::<Vec<_>>(), "every event once, in order:\n{body}");
    assert!(body.contains("event: test.live") && body.contains("while streaming"), "{body}");
    assert!(body.contains("event: host.added"));

    // A reconnecting client says where it was: only what came after.
    let last = all.last().expect("events").id;
    let out = Command::new("curl")
        .args(["-sN", "--max-time", "2", "-H", &format!("Last-Event-ID: {}", last - 1), &url])
        .output()
        .expect("curl");
    let body = String::from_utf8_lossy(&out.stdout);
    let ids: Vec<&str> = body.lines().filter_map(|l| l.strip_prefix("id: ")).collect();
    assert_eq!(ids, vec![last.to_string()], "{body}");
    // A bad host filter is refused.
    let (code, _, _) = curl(&[&format!("{}/api/v1/events/stream?host=Not%20A%20Host", s.base)]).await;
    assert_eq!(code, 400);
    // Shutdown ends open streams: the server task finishes promptly.
    let open = tokio::task::spawn_blocking(move || {
        Command::new("curl").args(["-sN", "--max-time", "30", &url]).output().expect("curl")
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.shutdown.cancel();
    let started = std::time::Instant::now();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.task).await.expect("the server stopped");
    let _ = open.await;
    assert!(started.elapsed() < Duration::from_secs(5), "shutdown waited for a stream");
}

/// Opens an event stream over a raw connection; returns the status code and, while it is
/// 200, the open connection.
async fn open_stream(base: &str) -> (u16, tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut conn = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let request = format!("GET /api/v1/events/stream HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    conn.write_all(request.as_bytes()).await.expect("send");
    let mut head = [0u8; 12];
    conn.read_exact(&mut head).await.expect("status line");
    let code = String::from_utf8_lossy(&head[9..12]).parse().expect("status");
    (code, conn)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn event_streams_are_capped_and_a_closed_one_frees_its_slot() {
    let s = start().await; // max_event_streams = 4
    let mut open = Vec::new();
    for _ in 0..4 {
        let (code, conn) = open_stream(&s.base).await;
        assert_eq!(code, 200);
        open.push(conn);
    }
    let (code, _) = open_stream(&s.base).await;
    assert_eq!(code, 503, "a fifth stream is refused");
    // The API still answers while the streams are full.
    let (code_hosts, _, _) = curl(&[&format!("{}/api/v1/hosts", s.base)]).await;
    assert_eq!(code_hosts, 200);
    // One closes: its slot is free again (once the server notices the closed connection).
    drop(open.remove(0));
    let started = std::time::Instant::now();
    loop {
        let (code, conn) = open_stream(&s.base).await;
        if code == 200 {
            open.push(conn);
            break;
        }
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "the slot was not freed: {code}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (code, _) = open_stream(&s.base).await;
    assert_eq!(code, 503, "full again");
}

#[tokio::test]
async fn a_database_error_is_logged_not_shown_to_the_client() {
    let s = start().await;
    s.store.close().await; // every query fails from now on
    let (code, _, body) = curl(&[&format!("{}/api/v1/hosts", s.base)]).await;
    let body = String::from_utf8_lossy(&body).into_owned();
    assert_eq!(code, 503, "{body}");
    let error: serde_json::Value = serde_json::from_str(&body).expect("a JSON error");
    assert_eq!(error["error"]["code"], "database", "{body}");
    assert!(error["error"]["message"].as_str().is_some_and(|m| m.contains("see the provisioner's log")), "{body}");
    for secret in ["pool", "sqlite", "closed", "nodekeeper.db", "SELECT"] {
        assert!(!body.contains(secret), "the cause leaked: {body}");
    }
}
