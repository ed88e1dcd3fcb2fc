//! A lab node's hardware — firmware, NIC model, disks — and the libvirt domain that emulates
//! it under QEMU TCG: SeaBIOS or OVMF (Secure Boot: the SMM build with Microsoft's keys
//! enrolled), virtio or Intel NICs (e1000e, igb), virtio, SATA (AHCI) and NVMe disks with
//! serials, so root-device hints and the deploy ramdisk's drivers meet devices as on a server.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use anyhow::{bail, Context};
pub use nodekeeper_store::BootPath;

/// How the node's firmware boots.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS.
    Bios,
    /// OVMF without Secure Boot.
    Uefi,
    /// OVMF with Secure Boot enforcing (Microsoft's keys enrolled).
    UefiSecureBoot,
}

impl Firmware {
    /// The host's boot mode, as `host add --boot-mode` takes it.
    pub fn boot_mode(self) -> &'static str {
        match self {
            Firmware::Bios => "bios",
            Firmware::Uefi => "uefi",
            Firmware::UefiSecureBoot => "uefi-secureboot",
        }
    }

    /// OVMF's code and variables template (`None` for BIOS).
    fn ovmf(self) -> Option<(&'static str, &'static str)> {
        match self {
            Firmware::Bios => None,
            Firmware::Uefi => Some(("/usr/share/OVMF/OVMF_CODE_4M.fd", "/usr/share/OVMF/OVMF_VARS_4M.fd")),
            Firmware::UefiSecureBoot => {
                Some(("/usr/share/OVMF/OVMF_CODE_4M.secboot.fd", "/usr/share/OVMF/OVMF_VARS_4M.ms.fd"))
            }
        }
    }
}

impl FromStr for Firmware {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> anyhow::Result<Firmware> {
        Ok(match s {
            "bios" => Firmware::Bios,
            "uefi" => Firmware::Uefi,
            "uefi-secureboot" => Firmware::UefiSecureBoot,
            _ => bail!("firmware {s:?}: expected bios, uefi or uefi-secureboot"),
        })
    }
}

impl fmt::Display for Firmware {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Firmware::Bios => "BIOS",
            Firmware::Uefi => "UEFI",
            Firmware::UefiSecureBoot => "UEFI Secure Boot",
        })
    }
}

/// How a disk is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bus {
    /// virtio-blk.
    Virtio,
    /// SATA on the machine's AHCI controller.
    Sata,
    /// An NVMe controller (a QEMU device: libvirt 9 has no NVMe disk bus).
    Nvme,
}

/// One disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Disk {
    /// Its bus.
    pub bus: Bus,
    /// Its size in GiB.
    pub gib: u64,
    /// Its serial number (what a root-device hint names).
    pub serial: String,
}

/// `nvme:2G,sata:4G`: disks in order, with serials `NK-NVME-1`, `NK-SATA-2`, ….
pub fn parse_disks(s: &str) -> anyhow::Result<Vec<Disk>> {
    let disks = s
        .split(',')
        .enumerate()
        .map(|(i, d)| {
            let (bus, size) = d.trim().split_once(':').with_context(|| format!("disk {d:?}: expected BUS:SIZE"))?;
            let bus = match bus {
                "virtio" => Bus::Virtio,
                "sata" => Bus::Sata,
                "nvme" => Bus::Nvme,
                _ => bail!("disk {d:?}: bus must be virtio, sata or nvme"),
            };
            let gib: u64 = size
                .trim_end_matches(['G', 'g'])
                .parse()
                .ok()
                .filter(|g| (2..=64).contains(g))
                .with_context(|| format!("disk {d:?}: size must be 2G..64G (the image needs 2 GiB)"))?;
            let serial = format!("NK-{}-{}", bus_name(bus).to_uppercase(), i + 1);
            Ok(Disk { bus, gib, serial })
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!disks.is_empty() && disks.len() <= 4, "1 to 4 disks");
    Ok(disks)
}

fn bus_name(bus: Bus) -> &'static str {
    match bus {
        Bus::Virtio => "virtio",
        Bus::Sata => "sata",
        Bus::Nvme => "nvme",
    }
}

/// A node's hardware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hardware {
    /// Its firmware.
    pub firmware: Firmware,
    /// libvirt's NIC model: `virtio`, `e1000e`, `igb`.
    pub nic: String,
    /// Its disks.
    pub disks: Vec<Disk>,
    /// How its firmware reaches the deploy ramdisk: `http` turns the firmware's PXE off (as
    /// a server's setup does when HTTP boot is chosen), so only UEFI HTTP boot is left.
    pub boot: BootPath,
}

/// What the domain is, beyond its hardware.
#[derive(Debug, Clone)]
pub struct Domain<'a> {
    /// libvirt's name.
    pub name: &'a str,
    /// Its UUID (the BMC's system id).
    pub uuid: &'a str,
    /// Its boot MAC.
    pub mac: &'a str,
    /// The bridge its NIC is on.
    pub bridge: &'a str,
    /// Its serial console's file.
    pub serial: &'a Path,
    /// Memory in MiB.
    pub memory_mib: u32,
    /// Give it an i6300esb watchdog (reset on expiry), which the guard arms.
    pub watchdog: bool,
    /// Where its disk files and UEFI variables go (readable by QEMU).
    pub dir: &'a Path,
}

impl Hardware {
    /// BIOS, virtio NIC, one 3 GiB virtio disk: the lab's node so far.
    pub fn virtio_bios() -> Hardware {
        Hardware {
            firmware: Firmware::Bios,
            nic: "virtio".into(),
            disks: parse_disks("virtio:3G").unwrap_or_default(),
            boot: BootPath::Pxe,
        }
    }

    /// A current server: UEFI (Secure Boot or not), an Intel e1000e NIC, a small NVMe disk and
    /// a larger SATA one.
    pub fn server(firmware: Firmware) -> Hardware {
        Hardware {
            firmware,
            nic: "e1000e".into(),
            disks: parse_disks("nvme:2G,sata:3G").unwrap_or_default(),
            boot: BootPath::Pxe,
        }
    }

    /// Checks the NIC model, and that this machine's QEMU has it (igb came with QEMU 8.0;
    /// Debian 12 ships 7.2).
    pub fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            ["virtio", "e1000e", "igb", "e1000"].contains(&self.nic.as_str()),
            "NIC {:?}: expected virtio, e1000e, igb or e1000",
            self.nic
        );
        // The BMC emulator's "boot from disk" orders libvirt's disks; an NVMe disk is a QEMU
        // device libvirt does not know (libvirt 9 has no NVMe bus), so it needs one beside it.
        anyhow::ensure!(
            self.disks.iter().any(|d| d.bus != Bus::Nvme),
            "disks {}: NVMe only cannot boot its disk here — sushy-tools sets the boot device on \
             libvirt's disks, and libvirt 9 has no NVMe bus: add a sata or virtio disk (e.g. sata:2G,nvme:3G)",
            self.describe()
        );
        anyhow::ensure!(
            self.boot != BootPath::Http || self.firmware != Firmware::Bios,
            "--boot http: UEFI HTTP boot needs UEFI firmware (--firmware uefi or uefi-secureboot)"
        );
        // QEMU's NICs carry iPXE as their option ROM, which boots on its own (by DHCP and
        // HTTP, but as iPXE, not as the firmware). For the firmware's own HTTP boot the ROM is
        // left out, and then OVMF drives only virtio NICs (its VirtioNetDxe; Intel NICs have
        // no driver in it but that ROM).
        anyhow::ensure!(
            self.boot != BootPath::Http || self.nic == "virtio",
            "--boot http: the firmware's own HTTP boot needs --nic virtio here (OVMF has no driver for {} but \
             QEMU's iPXE option ROM, which would boot instead of the firmware)",
            self.nic
        );
        if self.nic != "virtio" {
            let help = std::process::Command::new("qemu-system-x86_64").args(["-device", "help"]).output();
            let listed =
                help.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("name \"{}\"", self.nic)));
            anyhow::ensure!(
                listed,
                "NIC {}: this machine's QEMU has no such device (igb needs QEMU 8.0 or later); e1000e is an Intel NIC it has",
                self.nic
            );
        }
        Ok(())
    }

    /// The disk the image goes to: the last one (with several, a hint names it by serial).
    pub fn target(&self) -> Option<&Disk> {
        self.disks.last()
    }

    /// The `host add` arguments this hardware needs: the boot mode, and with several disks a
    /// root-device hint naming the target by serial.
    pub fn host_args(&self) -> Vec<String> {
        let mut args = vec!["--boot-mode".to_owned(), self.firmware.boot_mode().to_owned()];
        if self.boot != BootPath::Pxe {
            args.extend(["--boot".to_owned(), self.boot.to_string()]);
        }
        if self.disks.len() > 1 {
            if let Some(disk) = self.target() {
                args.extend(["--root-device".to_owned(), format!("serial={}", disk.serial)]);
            }
        }
        args
    }

    /// `UEFI Secure Boot, e1000e, nvme 2G + sata 3G`.
    pub fn describe(&self) -> String {
        let disks: Vec<String> = self.disks.iter().map(|d| format!("{} {}G", bus_name(d.bus), d.gib)).collect();
        let boot = if self.boot == BootPath::Pxe { String::new() } else { format!(", {} boot", self.boot) };
        format!("{}, {}, {}{boot}", self.firmware, self.nic, disks.join(" + "))
    }

    /// The domain's XML; makes its empty disk files (and its UEFI variables) in `d.dir`.
    /// Returns the XML and the disk files, in order.
    pub fn domain_xml(&self, d: &Domain<'_>) -> anyhow::Result<(String, Vec<PathBuf>)> {
        self.check()?;
        let (mut disks_xml, mut qemu_args, mut files) = (String::new(), String::new(), Vec::new());
        for (i, disk) in self.disks.iter().enumerate() {
            let file = d.dir.join(format!("{}-disk{i}.raw", d.name));
            std::fs::File::create(&file)
                .and_then(|f| f.set_len(disk.gib << 30))
                .with_context(|| format!("creating {}", file.display()))?;
            let letter = (b'a' + u8::try_from(i).unwrap_or(0)) as char;
            match disk.bus {
                Bus::Nvme => {
                    // libvirt gives QEMU's user access only to the disks it knows of: this
                    // one is passed on QEMU's command line, so it is opened to that user here.
                    std::fs::set_permissions(&file, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
                    // A slot of its own on the root bus (slot 0x10 + i), clear of the ones
                    // libvirt hands out from 1 upwards; a boot index after the devices
                    // libvirt orders (the BMC emulator orders only those), so the firmware
                    // tries it when the disks before it hold nothing bootable — as a server's
                    // firmware goes down its disks.
                    let bus = if self.firmware == Firmware::Bios { "pci.0" } else { "pcie.0" };
                    qemu_args.push_str(&format!(
                        "<qemu:arg value='-drive'/><qemu:arg value='file={},if=none,id=nvme{i},format=raw'/>\
                         <qemu:arg value='-device'/><qemu:arg value='nvme,drive=nvme{i},serial={},bus={bus},addr={:#x},bootindex={}'/>",
                        file.display(),
                        disk.serial,
                        0x10 + i,
                        10 + i
                    ));
                }
                Bus::Virtio | Bus::Sata => {
                    let (dev, bus) = if disk.bus == Bus::Virtio { ("vd", "virtio") } else { ("sd", "sata") };
                    disks_xml.push_str(&format!(
                        "<disk type='file' device='disk'><driver name='qemu' type='raw'/><source file='{}'/>\
                         <target dev='{dev}{letter}' bus='{bus}'/><serial>{}</serial></disk>",
                        file.display(),
                        disk.serial
                    ));
                }
            }
            files.push(file);
        }
        let (machine, loader, smm) = match self.firmware.ovmf() {
            None => ("pc", String::new(), ""),
            Some((code, vars)) => {
                let nvram = d.dir.join(format!("{}-VARS.fd", d.name));
                std::fs::copy(vars, &nvram).with_context(|| format!("{vars} (apt-get install ovmf)"))?;
                let secure = self.firmware == Firmware::UefiSecureBoot;
                (
                    "q35",
                    format!(
                        "<loader readonly='yes' secure='{}' type='pflash'>{code}</loader><nvram>{}</nvram>",
                        if secure { "yes" } else { "no" },
                        nvram.display()
                    ),
                    if secure { "<smm state='on'/>" } else { "" },
                )
            }
        };
        if self.boot == BootPath::Http {
            // OVMF's own switches (fw_cfg, EDK2's NetworkPkg PCDs): no PXE boot options, so
            // the NIC's boot entries are UEFI HTTP boot's only.
            for pcd in ["IPv4PXESupport", "IPv6PXESupport"] {
                qemu_args.push_str(&format!(
                    "<qemu:arg value='-fw_cfg'/><qemu:arg value='name=opt/org.tianocore/{pcd},string=n'/>"
                ));
            }
        }
        let commandline = if qemu_args.is_empty() {
            String::new()
        } else {
            format!("<qemu:commandline>{qemu_args}</qemu:commandline>")
        };
        let xml = format!(
            "<domain type='qemu' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'><name>{name}</name><uuid>{uuid}</uuid>\
             <memory unit='MiB'>{memory}</memory><vcpu>1</vcpu>\
             <os><type arch='x86_64' machine='{machine}'>hvm</type>{loader}<boot dev='hd'/></os>\
             <features><acpi/>{smm}</features>\
             <devices>{disks_xml}\
             <interface type='bridge'><mac address='{mac}'/><source bridge='{bridge}'/><model type='{nic}'/>{rom}</interface>\
             <serial type='file'><source path='{serial}' append='on'/><target port='0'/></serial>\
             <console type='file'><source path='{serial}' append='on'/><target type='serial' port='0'/></console>\
             {watchdog}</devices>{commandline}</domain>",
            name = d.name,
            uuid = d.uuid,
            memory = d.memory_mib,
            mac = d.mac,
            bridge = d.bridge,
            nic = self.nic,
            rom = if self.boot == BootPath::Http { "<rom enabled='no'/>" } else { "" },
            serial = d.serial.display(),
            watchdog = if d.watchdog { "<watchdog model='i6300esb' action='reset'/>" } else { "" },
        );
        Ok((xml, files))
    }
}

/// A libvirt `dir` storage pool for sushy-tools' virtual media (its libvirt driver uploads
/// each inserted image into a volume of a pool, `default` unless its config names another),
/// and the sushy-tools config file that names it. Destroyed and undefined on drop.
#[derive(Debug)]
pub struct MediaPool {
    /// The pool's name.
    pub name: String,
    /// `sushy-emulator --config` this.
    pub config: PathBuf,
}

impl MediaPool {
    /// A pool `nk-media-TAG` over `dir` (made here), started.
    pub fn new(dir: &Path, tag: &str) -> anyhow::Result<MediaPool> {
        let name = format!("nk-media-{tag}");
        let target = dir.join("pool");
        std::fs::create_dir_all(&target).with_context(|| format!("creating {}", target.display()))?;
        let virsh = |args: &[&str]| -> anyhow::Result<()> {
            let out = std::process::Command::new("virsh").args(args).output().context("virsh")?;
            anyhow::ensure!(out.status.success(), "virsh {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
            Ok(())
        };
        let _ = std::process::Command::new("virsh").args(["pool-destroy", &name]).output();
        let _ = std::process::Command::new("virsh").args(["pool-undefine", &name]).output();
        virsh(&["pool-define-as", &name, "dir", "--target", &target.display().to_string()])?;
        let pool = MediaPool { name: name.clone(), config: dir.join("sushy.conf") };
        virsh(&["pool-start", &name])?;
        std::fs::write(&pool.config, format!("SUSHY_EMULATOR_STORAGE_POOL = '{name}'\n"))?;
        Ok(pool)
    }
}

impl Drop for MediaPool {
    fn drop(&mut self) {
        let _ = std::process::Command::new("virsh").args(["pool-destroy", &self.name]).output();
        let _ = std::process::Command::new("virsh").args(["pool-undefine", &self.name]).output();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disks_parse_with_serials_and_bad_ones_are_refused() {
        let d = parse_disks("nvme:2G, sata:4G").expect("disks");
        assert_eq!(
            d,
            [
                Disk { bus: Bus::Nvme, gib: 2, serial: "NK-NVME-1".into() },
                Disk { bus: Bus::Sata, gib: 4, serial: "NK-SATA-2".into() }
            ]
        );
        for bad in ["", "nvme", "scsi:2G", "nvme:1G", "nvme:huge", "virtio:2G,virtio:2G,virtio:2G,virtio:2G,sata:2G"] {
            assert!(parse_disks(bad).is_err(), "{bad:?}");
        }
        assert!("uefi-secureboot".parse::<Firmware>().is_ok() && "efi".parse::<Firmware>().is_err());
    }

    #[test]
    fn a_server_gets_ovmf_with_secure_boot_an_nvme_device_and_a_hint_for_its_sata_disk() {
        let dir = tempfile::tempdir().expect("dir");
        let hw = Hardware::server(Firmware::UefiSecureBoot);
        assert_eq!(hw.host_args(), ["--boot-mode", "uefi-secureboot", "--root-device", "serial=NK-SATA-2"]);
        assert_eq!(hw.describe(), "UEFI Secure Boot, e1000e, nvme 2G + sata 3G");
        let serial = dir.path().join("console");
        let d = Domain {
            name: "n1",
            uuid: "u",
            mac: "52:54:00:00:00:01",
            bridge: "br0",
            serial: &serial,
            memory_mib: 1024,
            watchdog: true,
            dir: dir.path(),
        };
        if !Path::new("/usr/share/OVMF/OVMF_VARS_4M.ms.fd").exists() {
            return; // no OVMF here: the XML cannot name its files
        }
        let (xml, files) = hw.domain_xml(&d).expect("xml");
        assert_eq!(files.len(), 2);
        assert_eq!(std::fs::metadata(&files[1]).expect("sata").len(), 3 << 30);
        for part in [
            "machine='q35'",
            "secure='yes' type='pflash'>/usr/share/OVMF/OVMF_CODE_4M.secboot.fd",
            "<smm state='on'/>",
            "nvme,drive=nvme0,serial=NK-NVME-1,bus=pcie.0,addr=0x10,bootindex=10",
            "bus='sata'/><serial>NK-SATA-2</serial>",
            "<model type='e1000e'/>",
            "i6300esb",
        ] {
            assert!(xml.contains(part), "{part} in {xml}");
        }
        let bios = Hardware::virtio_bios();
        assert_eq!(bios.host_args(), ["--boot-mode", "bios"], "one disk: no hint");
        let (xml, _) = bios.domain_xml(&Domain { watchdog: false, ..d }).expect("xml");
        assert!(xml.contains("machine='pc'") && !xml.contains("loader") && !xml.contains("qemu:commandline"));
        let nvme_only = Hardware { disks: parse_disks("nvme:3G").expect("disks"), ..bios.clone() };
        assert!(nvme_only.check().expect_err("nvme only").to_string().contains("add a sata or virtio disk"));
        let bad = Hardware { nic: "rtl8139x".into(), ..bios.clone() };
        assert!(bad.domain_xml(&d).is_err());
        // igb is refused with a reason wherever QEMU lacks it (before 8.0, as Debian 12's 7.2).
        // UEFI HTTP boot: OVMF's PXE off, the NIC's iPXE ROM left out; only on UEFI and virtio.
        let http = Hardware {
            boot: BootPath::Http,
            nic: "virtio".into(),
            disks: parse_disks("sata:3G").expect("disks"),
            ..Hardware::server(Firmware::Uefi)
        };
        assert_eq!(http.host_args(), ["--boot-mode", "uefi", "--boot", "http"]);
        let (xml, _) = http.domain_xml(&Domain { watchdog: false, ..d.clone() }).expect("xml");
        for part in [
            "name=opt/org.tianocore/IPv4PXESupport,string=n",
            "name=opt/org.tianocore/IPv6PXESupport,string=n",
            "<model type='virtio'/><rom enabled='no'/>",
        ] {
            assert!(xml.contains(part), "{part} in {xml}");
        }
        let e = Hardware { nic: "e1000e".into(), ..http.clone() }.check().expect_err("e1000e").to_string();
        assert!(e.contains("--nic virtio"), "{e}");
        let e = Hardware { firmware: Firmware::Bios, ..http }.check().expect_err("bios").to_string();
        assert!(e.contains("needs UEFI firmware"), "{e}");
        let igb = Hardware { nic: "igb".into(), ..bios };
        let has_igb = std::process::Command::new("qemu-system-x86_64")
            .args(["-device", "help"])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("name \"igb\""));
        if !has_igb {
            let e = igb.check().expect_err("no igb here").to_string();
            assert!(e.contains("QEMU 8.0"), "{e}");
        }
    }
}
