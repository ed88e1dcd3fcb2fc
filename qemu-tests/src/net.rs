//! The provisioning network: a namespace with a bridge `br0` (10.20.0.1/24) where the
//! provisioner and the BMC emulator run, joined by a veth pair to a bridge in the root
//! namespace that libvirt plugs the nodes' NICs into. Everything is removed on drop, and the
//! processes started in the namespace are killed by id.

use std::process::{Child, Command, Output, Stdio};

use anyhow::Context;

/// The lab's network and the processes in it.
#[derive(Debug)]
pub struct Net {
    /// The namespace's name.
    pub ns: String,
    /// The root-namespace bridge the nodes' NICs join.
    pub bridge: String,
    veth: String,
    children: Vec<Child>,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip")?;
    anyhow::ensure!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

impl Net {
    /// Builds it. `tag` keeps the names short and unique (interface names: 15 bytes).
    pub fn new(tag: &str) -> anyhow::Result<Net> {
        let ns = format!("nklab{tag}");
        ip(&["netns", "add", &ns])?;
        let net =
            Net { ns: ns.clone(), bridge: format!("nklb{tag}"), veth: format!("nklv{tag}"), children: Vec::new() };
        ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        ip(&["-n", &ns, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &ns, "addr", "add", "10.20.0.1/24", "dev", "br0"])?;
        ip(&["-n", &ns, "link", "set", "br0", "up"])?;
        ip(&["link", "add", &net.bridge, "type", "bridge"])?;
        ip(&["link", "add", &net.veth, "type", "veth", "peer", "name", "up0", "netns", &ns])?;
        ip(&["link", "set", &net.veth, "master", &net.bridge, "up"])?;
        ip(&["link", "set", &net.bridge, "up"])?;
        ip(&["-n", &ns, "link", "set", "up0", "master", "br0", "up"])?;
        Ok(net)
    }

    /// A command that runs inside the namespace.
    pub fn cmd(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }

    /// Runs to completion inside the namespace, bounded by `timeout SECONDS`.
    pub fn run(&self, seconds: u32, program: &str, args: &[&str]) -> anyhow::Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", &self.ns, "timeout", &seconds.to_string(), program])
            .args(args)
            .output()
            .with_context(|| format!("running {program} in {}", self.ns))
    }

    /// Starts a long-running process inside the namespace, its output to `log`; killed when
    /// the lab goes (or by [`Net::stop`]). Returns its pid.
    pub fn spawn(&mut self, program: &str, args: &[&str], log: &std::path::Path) -> anyhow::Result<u32> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(log).context("log")?;
        let child = self
            .cmd(program)
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        let id = child.id();
        self.children.push(child);
        Ok(id)
    }

    /// Stops a process started by [`Net::spawn`] (SIGTERM, then SIGKILL after 5 s).
    pub fn stop(&mut self, pid: u32) {
        if let Some(i) = self.children.iter().position(|c| c.id() == pid) {
            let mut c = self.children.remove(i);
            terminate(&mut c);
        }
    }
}

fn terminate(c: &mut Child) {
    let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).status();
    for _ in 0..50 {
        if c.try_wait().ok().flatten().is_some() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = c.kill();
    let _ = c.wait();
}

impl Drop for Net {
    fn drop(&mut self) {
        for c in &mut self.children {
            terminate(c);
        }
        for link in [&self.veth, &self.bridge] {
            let _ = Command::new("ip").args(["link", "del", link]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}
