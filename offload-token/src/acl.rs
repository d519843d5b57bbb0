//! Who may do what: [`Principal`]s (the callers of offload read and write), the
//! [`AccessPolicy`] a provider consults (may this principal read disk X, write disk Y), and
//! two policies: [`Acl`] (explicit grants) and [`AllowAll`] (for a single-user tool whose
//! operating system already decided by letting it open the files).

use std::collections::{HashMap, HashSet};
use std::fmt;

use parking_lot::RwLock;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::hex;

/// A principal's 16-byte id, as recorded in a token's minter and audience fields.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PrincipalId([u8; 16]);

impl PrincipalId {
    /// The id of the principal named `name`: the first 16 bytes of
    /// SHA-256("vdisk principal\0" || name).
    pub fn from_name(name: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"vdisk principal\0");
        h.update(name.as_bytes());
        let d = h.finalize();
        let mut id = [0u8; 16];
        id.copy_from_slice(&d[..16]);
        PrincipalId(id)
    }

    /// An id from its bytes.
    pub const fn from_bytes(bytes: [u8; 16]) -> Self {
        PrincipalId(bytes)
    }

    /// The id's bytes.
    pub const fn as_bytes(&self) -> &[u8; 16] {
        &self.0
    }
}

impl fmt::Display for PrincipalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0))
    }
}

impl fmt::Debug for PrincipalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PrincipalId({self})")
    }
}

/// A caller of the provider: a name and the id derived from it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    name: String,
    id: PrincipalId,
}

impl Principal {
    /// The principal named `name` (e.g. "uid:1000", "host-b", "vm-42").
    pub fn new(name: impl Into<String>) -> Self {
        let name = name.into();
        let id = PrincipalId::from_name(&name);
        Principal { name, id }
    }

    /// The name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id recorded in tokens.
    pub fn id(&self) -> PrincipalId {
        self.id
    }
}

/// Reading (minting a token over a disk) or writing (redeeming a token into a disk).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Access {
    /// Offload read: mint a token over the disk's data.
    Read,
    /// Offload write: redeem a token into the disk.
    Write,
}

impl fmt::Display for Access {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Access::Read => "read",
            Access::Write => "write",
        })
    }
}

/// The rights a provider consults: at mint, may the caller read the source; at redeem, may
/// the caller write the destination, and may the token's minter still read the source.
pub trait AccessPolicy: Send + Sync + fmt::Debug {
    /// Whether `who` may `access` the disk `disk`.
    fn allows(&self, who: &PrincipalId, access: Access, disk: &Uuid) -> bool;
}

/// Every principal may read and write every disk. For a single-user tool (the `vdisk token`
/// verbs), where the operating system already checked the user may open the images.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllowAll;

impl AccessPolicy for AllowAll {
    fn allows(&self, _: &PrincipalId, _: Access, _: &Uuid) -> bool {
        true
    }
}

/// Explicit grants, changeable while a provider uses them; everything not granted is refused.
#[derive(Debug, Default)]
pub struct Acl {
    grants: RwLock<HashMap<PrincipalId, HashSet<(Uuid, AccessKey)>>>,
}

/// `Access` as a hash key (kept private so `Access` stays a plain enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum AccessKey {
    Read,
    Write,
}

impl From<Access> for AccessKey {
    fn from(a: Access) -> Self {
        match a {
            Access::Read => AccessKey::Read,
            Access::Write => AccessKey::Write,
        }
    }
}

impl Acl {
    /// An empty list: nobody may do anything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Lets `who` `access` the disk `disk`.
    pub fn grant(&self, who: &PrincipalId, access: Access, disk: Uuid) {
        self.grants
            .write()
            .entry(*who)
            .or_default()
            .insert((disk, access.into()));
    }

    /// Takes back a grant; returns whether there was one.
    pub fn revoke(&self, who: &PrincipalId, access: Access, disk: Uuid) -> bool {
        self.grants
            .write()
            .get_mut(who)
            .is_some_and(|s| s.remove(&(disk, access.into())))
    }
}

impl AccessPolicy for Acl {
    fn allows(&self, who: &PrincipalId, access: Access, disk: &Uuid) -> bool {
        self.grants
            .read()
            .get(who)
            .is_some_and(|s| s.contains(&(*disk, access.into())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn principal_ids_are_stable_and_distinct() {
        assert_eq!(Principal::new("a").id(), PrincipalId::from_name("a"));
        assert_ne!(Principal::new("a").id(), Principal::new("b").id());
    }

    #[test]
    fn acl_grants_exactly_what_it_was_given() {
        let acl = Acl::new();
        let p = PrincipalId::from_name("p");
        let d = Uuid::from_u128(1);
        assert!(!acl.allows(&p, Access::Read, &d));
        acl.grant(&p, Access::Read, d);
        assert!(acl.allows(&p, Access::Read, &d));
        assert!(!acl.allows(&p, Access::Write, &d));
        assert!(!acl.allows(&p, Access::Read, &Uuid::from_u128(2)));
        assert!(acl.revoke(&p, Access::Read, d));
        assert!(!acl.allows(&p, Access::Read, &d));
    }
}
