//! One way to talk to libvirt: open a connection to `uri`, do the work, close it whatever
//! happened (the guard's passes are short, and a connection left open keeps libvirtd's
//! client slot).

use anyhow::Context;

/// Runs `work` on a fresh connection to `uri`, then closes it.
pub fn with_connection<T>(
    uri: &str,
    work: impl FnOnce(&virt::connect::Connect) -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let mut conn =
        virt::connect::Connect::open(Some(uri)).with_context(|| format!("connecting to libvirt at {uri}"))?;
    let result = work(&conn);
    let _ = conn.close();
    result
}

/// A listed domain's XML, or `None` when it went away since it was listed (undefined, or
/// migrated away and its transient definition gone): not an error of libvirt's.
pub fn xml_unless_gone(dom: &virt::domain::Domain, flags: u32) -> anyhow::Result<Option<String>> {
    match dom.get_xml_desc(flags) {
        Ok(xml) => Ok(Some(xml)),
        Err(e) if e.code() == virt::error::ErrorNumber::NoDomain => Ok(None),
        Err(e) => Err(anyhow::Error::from(e).context("reading a domain's XML")),
    }
}
