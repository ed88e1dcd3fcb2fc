//! Reading what the guard needs from a libvirt domain XML: `<uuid>`, `<name>`, and the
//! nodekeeper metadata element
//! `<metadata><nk:instance xmlns:nk="https://nodekeeper.dev/xmlns/instance/1" generation="3" ha="true"/></metadata>`.

use nodekeeper_store::{Generation, InstanceId};

/// The XML namespace of nodekeeper's metadata element.
pub const NK_NAMESPACE: &str = "https://nodekeeper.dev/xmlns/instance/1";

/// The largest domain XML read (libvirt's own are a few KiB; a larger file is not one).
pub const MAX_XML_BYTES: usize = 4 << 20;

/// What a domain definition says about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainMeta {
    /// `<uuid>`
    pub uuid: InstanceId,
    /// `<name>`
    pub name: String,
    /// `nk:instance/@generation`: the generation this host last knew, if recorded.
    pub generation: Option<Generation>,
    /// `nk:instance/@ha`, if recorded.
    pub ha: Option<bool>,
}

/// Why a file is not a usable domain definition.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainXmlError {
    /// Larger than [`MAX_XML_BYTES`].
    #[error("larger than {MAX_XML_BYTES} bytes")]
    TooLarge,
    /// Not well-formed XML (DTDs are refused too).
    #[error("malformed XML: {0}")]
    Malformed(String),
    /// The root element is not `<domain>`.
    #[error("root element is <{0}>, not <domain>")]
    NotADomain(String),
    /// A required element is missing or empty.
    #[error("no <{0}> element")]
    Missing(&'static str),
    /// `<uuid>` does not hold a UUID.
    #[error("<uuid> {0:?} is not a UUID")]
    BadUuid(String),
    /// The nodekeeper metadata element has an unreadable attribute.
    #[error("nk:instance attribute {attr}={value:?} is invalid")]
    BadMetadata {
        /// The attribute.
        attr: &'static str,
        /// Its value.
        value: String,
    },
}

/// Parses a domain definition. Pure; never panics on any input.
pub fn parse_domain_xml(bytes: &[u8]) -> Result<DomainMeta, DomainXmlError> {
    if bytes.len() > MAX_XML_BYTES {
        return Err(DomainXmlError::TooLarge);
    }
    let text = std::str::from_utf8(bytes).map_err(|e| DomainXmlError::Malformed(e.to_string()))?;
    let doc = roxmltree::Document::parse(text).map_err(|e| DomainXmlError::Malformed(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
        return Err(DomainXmlError::NotADomain(root.tag_name().name().to_owned()));
    }
    let child_text = |name: &'static str| -> Result<String, DomainXmlError> {
        let node = root
            .children()
            .find(|n| n.is_element() && n.tag_name().name() == name && n.tag_name().namespace().is_none())
            .ok_or(DomainXmlError::Missing(name))?;
        let text = node.text().unwrap_or_default().trim();
        if text.is_empty() {
            return Err(DomainXmlError::Missing(name));
        }
        Ok(text.to_owned())
    };
    let uuid_text = child_text("uuid")?;
    let uuid = uuid_text.parse().map_err(|_| DomainXmlError::BadUuid(uuid_text))?;
    let name = child_text("name")?;

    let nk = root
        .children()
        .filter(|n| n.is_element() && n.tag_name().name() == "metadata")
        .flat_map(|m| m.children())
        .find(|n| {
            n.is_element() && n.tag_name().name() == "instance" && n.tag_name().namespace() == Some(NK_NAMESPACE)
        });
    let (mut generation, mut ha) = (None, None);
    if let Some(nk) = nk {
        if let Some(v) = nk.attribute("generation") {
            let g: u64 = v
                .trim()
                .parse()
                .map_err(|_| DomainXmlError::BadMetadata { attr: "generation", value: v.to_owned() })?;
            generation = Some(Generation(g));
        }
        if let Some(v) = nk.attribute("ha") {
            ha = Some(match v.trim() {
                "true" | "1" | "yes" => true,
                "false" | "0" | "no" => false,
                _ => return Err(DomainXmlError::BadMetadata { attr: "ha", value: v.to_owned() }),
            });
        }
    }
    Ok(DomainMeta { uuid, name, generation, ha })
}

/// `xml` (a domain's XML) with nodekeeper's metadata element saying `generation` and `ha`:
/// the element replaced where it is, else added to `<metadata>`, else a `<metadata>` added.
/// What a live migration sends as the domain's XML on its target (it arrives at its next
/// generation). Everything else is left byte for byte.
pub fn with_instance_metadata(xml: &str, generation: Generation, ha: bool) -> Result<String, DomainXmlError> {
    let doc = roxmltree::Document::parse(xml).map_err(|e| DomainXmlError::Malformed(e.to_string()))?;
    let root = doc.root_element();
    if root.tag_name().name() != "domain" || root.tag_name().namespace().is_some() {
        return Err(DomainXmlError::NotADomain(root.tag_name().name().to_owned()));
    }
    let element = format!("<nk:instance xmlns:nk=\"{NK_NAMESPACE}\" generation=\"{}\" ha=\"{ha}\"/>", generation.0);
    let metadata = child(root, "metadata");
    let nk = metadata.and_then(|m| {
        m.children().find(|n| {
            n.is_element() && n.tag_name().name() == "instance" && n.tag_name().namespace() == Some(NK_NAMESPACE)
        })
    });
    let splice =
        |range: std::ops::Range<usize>, with: &str| format!("{}{with}{}", &xml[..range.start], &xml[range.end..]);
    Ok(match (metadata, nk) {
        (_, Some(nk)) => splice(nk.range(), &element),
        (Some(m), None) => match m.first_child() {
            Some(first) => splice(first.range().start..first.range().start, &element),
            None => splice(m.range(), &format!("<metadata>{element}</metadata>")),
        },
        (None, None) => {
            let end = xml[..root.range().end].rfind("</domain").ok_or(DomainXmlError::Missing("</domain>"))?;
            splice(end..end, &format!("<metadata>{element}</metadata>"))
        }
    })
}

/// A file-backed disk of a domain definition: what recreating it on a new host takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileDisk {
    /// `<target dev>`, for messages.
    pub target: String,
    /// `<source file>`.
    pub path: std::path::PathBuf,
    /// `<driver type>` (`raw` when absent, as libvirt assumes).
    pub format: String,
    /// `<backingStore type='file'>`: its `<source file>` and `<format type>`.
    pub backing: Option<(std::path::PathBuf, String)>,
}

/// The first child element of `n` named `name` (no namespace).
fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, name: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children().find(|c| c.is_element() && c.tag_name().name() == name && c.tag_name().namespace().is_none())
}

/// The file-backed disks (`<disk type='file' device='disk'>`) of a domain definition, in
/// order. Pure; never panics on any input.
pub fn file_disks(bytes: &[u8]) -> Result<Vec<FileDisk>, DomainXmlError> {
    if bytes.len() > MAX_XML_BYTES {
        return Err(DomainXmlError::TooLarge);
    }
    let text = std::str::from_utf8(bytes).map_err(|e| DomainXmlError::Malformed(e.to_string()))?;
    let doc = roxmltree::Document::parse(text).map_err(|e| DomainXmlError::Malformed(e.to_string()))?;
    let mut out = Vec::new();
    let root = doc.root_element();
    for disk in child(root, "devices").into_iter().flat_map(|d| d.children()) {
        let is_file_disk = disk.is_element()
            && disk.tag_name().name() == "disk"
            && disk.attribute("type") == Some("file")
            && disk.attribute("device").unwrap_or("disk") == "disk";
        if !is_file_disk {
            continue;
        }
        let Some(path) = child(disk, "source").and_then(|s| s.attribute("file")) else { continue };
        let backing = child(disk, "backingStore").filter(|b| b.attribute("type") == Some("file")).and_then(|b| {
            let file = child(b, "source")?.attribute("file")?;
            let format = child(b, "format").and_then(|f| f.attribute("type")).unwrap_or("raw");
            Some((std::path::PathBuf::from(file), format.to_owned()))
        });
        out.push(FileDisk {
            target: child(disk, "target").and_then(|t| t.attribute("dev")).unwrap_or("?").to_owned(),
            path: std::path::PathBuf::from(path),
            format: child(disk, "driver").and_then(|d| d.attribute("type")).unwrap_or("raw").to_owned(),
            backing,
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_migration_sends_the_xml_with_the_next_generation_and_nothing_else_changed() {
        let base =
            "<domain type='qemu'><name>x</name><uuid>6c1d3f2a-0b1e-4c53-9a0e-1f2d3c4b5a01</uuid>{M}<devices/></domain>";
        let nk = format!("<nk:instance xmlns:nk='{NK_NAMESPACE}' generation='3' ha='true'/>");
        let other = "<app:x xmlns:app='urn:other'>keep</app:x>";
        for metadata in [
            format!("<metadata>{nk}</metadata>"),
            format!("<metadata>{other}{nk}</metadata>"),
            format!("<metadata>{other}</metadata>"),
            "<metadata/>".to_owned(),
            String::new(),
        ] {
            let xml = base.replace("{M}", &metadata);
            let out = with_instance_metadata(&xml, Generation(4), true).expect("rewritten");
            let meta = parse_domain_xml(out.as_bytes()).expect("still a domain");
            assert_eq!((meta.generation, meta.ha, meta.name.as_str()), (Some(Generation(4)), Some(true), "x"), "{out}");
            assert!(out.contains("<devices/>") && out.starts_with("<domain type='qemu'>"), "{out}");
            assert_eq!(out.contains("urn:other"), metadata.contains("urn:other"), "other metadata kept: {out}");
            assert_eq!(out.matches("nodekeeper.dev").count(), 1, "{out}");
        }
        assert!(with_instance_metadata("<pool/>", Generation(1), true).is_err());
        assert!(with_instance_metadata("<domain>", Generation(1), true).is_err());
    }

    #[test]
    fn file_disks_with_their_backing_images() {
        let xml = "<domain><name>x</name><uuid>6c1d3f2a-0b1e-4c53-9a0e-1f2d3c4b5a01</uuid><devices>\
            <disk type='file' device='disk'><driver name='qemu' type='qcow2'/><source file='/var/lib/nova/x/disk'/>\
              <backingStore type='file'><format type='raw'/><source file='/var/lib/nova/_base/img'/></backingStore>\
              <target dev='vda' bus='virtio'/></disk>\
            <disk type='file' device='cdrom'><source file='/iso/x.iso'/><target dev='hdc'/></disk>\
            <disk type='block' device='disk'><source dev='/dev/sdb'/><target dev='vdb'/></disk>\
            <disk type='file'><source file='/data/plain.raw'/><target dev='vdc'/></disk>\
            </devices></domain>";
        let disks = file_disks(xml.as_bytes()).expect("valid");
        assert_eq!(disks.len(), 2, "{disks:?}");
        assert_eq!(disks[0].target, "vda");
        assert_eq!(disks[0].format, "qcow2");
        assert_eq!(disks[0].backing, Some(("/var/lib/nova/_base/img".into(), "raw".into())));
        assert_eq!(
            (disks[1].path.to_str(), disks[1].format.as_str(), &disks[1].backing),
            (Some("/data/plain.raw"), "raw", &None)
        );
        assert!(file_disks(b"<domain><devices>").is_err());
        assert!(file_disks(b"<domain/>").expect("no devices").is_empty());
    }

    const UUID: &str = "6c1d3f2a-0b1e-4c53-9a0e-1f2d3c4b5a01";

    fn xml(meta: &str) -> String {
        format!("<domain type='qemu'>\n  <name>web-1</name>\n  <uuid>{UUID}</uuid>\n  <metadata>{meta}</metadata>\n</domain>\n")
    }

    #[test]
    fn reads_uuid_name_and_metadata() {
        let m = parse_domain_xml(
            xml(&format!("<nk:instance xmlns:nk='{NK_NAMESPACE}' generation='3' ha='true'/>")).as_bytes(),
        )
        .expect("valid");
        assert_eq!(m.uuid.to_string(), UUID);
        assert_eq!(m.name, "web-1");
        assert_eq!(m.generation, Some(Generation(3)));
        assert_eq!(m.ha, Some(true));
    }

    #[test]
    fn metadata_is_optional_and_namespaced() {
        let none = parse_domain_xml(xml("").as_bytes()).expect("no metadata");
        assert_eq!((none.generation, none.ha), (None, None));
        // Another application's <instance> element is not ours.
        let other = parse_domain_xml(xml("<x:instance xmlns:x='urn:other' generation='9'/>").as_bytes()).expect("ok");
        assert_eq!(other.generation, None);
        // Only the element's namespace counts, not its prefix.
        let prefixed =
            parse_domain_xml(xml(&format!("<foo:instance xmlns:foo='{NK_NAMESPACE}' ha='false'/>")).as_bytes())
                .expect("ok");
        assert_eq!(prefixed.ha, Some(false));
    }

    #[test]
    fn bad_definitions_say_why() {
        let nk = |attrs: &str| xml(&format!("<nk:instance xmlns:nk='{NK_NAMESPACE}' {attrs}/>"));
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (b"<domain><name>x</name>".to_vec(), "malformed XML"),
            (b"".to_vec(), "malformed XML"),
            (vec![0xff, 0xfe, b'<'], "malformed XML"),
            (b"<network><name>x</name></network>".to_vec(), "root element is <network>"),
            (format!("<domain><uuid>{UUID}</uuid></domain>").into_bytes(), "no <name>"),
            (b"<domain><name>x</name></domain>".to_vec(), "no <uuid>"),
            (b"<domain><name>x</name><uuid>  </uuid></domain>".to_vec(), "no <uuid>"),
            (b"<domain><name>x</name><uuid>nope</uuid></domain>".to_vec(), "is not a UUID"),
            (nk("generation='-1'").into_bytes(), "generation=\"-1\""),
            (nk("ha='maybe'").into_bytes(), "ha=\"maybe\""),
            (
                b"<!DOCTYPE d [<!ENTITY a 'aaaa'>]><domain><name>&a;</name><uuid>6c1d3f2a-0b1e-4c53-9a0e-1f2d3c4b5a01</uuid></domain>".to_vec(),
                "malformed XML",
            ),
            (vec![b' '; MAX_XML_BYTES + 1], "larger than"),
        ];
        for (input, want) in cases {
            let err = parse_domain_xml(&input).expect_err(&String::from_utf8_lossy(&input[..input.len().min(80)]));
            assert!(err.to_string().contains(want), "{err} should contain {want}");
        }
    }
}
