//! POSIX access ACLs kept as the kernel passes them (`system.posix_acl_access`, the
//! `posix_acl_xattr` format: a u32 version 2, then (u16 tag, u16 perm, u32 id) entries,
//! little endian), tied to the mode bits as ext4 ties them: setting an ACL sets the
//! owner, group (the mask when there is one) and other bits, an ACL that says no more
//! than the mode is not stored, and chmod rewrites those entries; a new object inherits
//! its directory's default ACL as ext4 does (`posix_acl_create`). Pure functions.

use crate::error::{Error, Result};

const VERSION: u32 = 2;
const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// The name of the access ACL xattr.
pub const ACCESS: &[u8] = b"system.posix_acl_access";
/// The name of the default ACL xattr (directories).
pub const DEFAULT: &[u8] = b"system.posix_acl_default";

fn entries(v: &[u8]) -> Result<Vec<(u16, u16, u32)>> {
    if v.len() < 4 || !(v.len() - 4).is_multiple_of(8) {
        return Err(Error::invalid("malformed POSIX ACL"));
    }
    if u32::from_le_bytes(v[..4].try_into().expect("4 bytes")) != VERSION {
        return Err(Error::invalid("POSIX ACL version is not 2"));
    }
    let out: Vec<(u16, u16, u32)> = v[4..]
        .chunks_exact(8)
        .map(|c| {
            (
                u16::from_le_bytes([c[0], c[1]]),
                u16::from_le_bytes([c[2], c[3]]),
                u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
            )
        })
        .collect();
    let count = |t| out.iter().filter(|e| e.0 == t).count();
    let valid_tags = out
        .iter()
        .all(|e| [USER_OBJ, USER, GROUP_OBJ, GROUP, MASK, OTHER].contains(&e.0) && e.1 <= 7);
    let named = count(USER) + count(GROUP);
    if !valid_tags
        || count(USER_OBJ) != 1
        || count(GROUP_OBJ) != 1
        || count(OTHER) != 1
        || count(MASK) > 1
        || (named > 0 && count(MASK) != 1)
    {
        return Err(Error::invalid("invalid POSIX ACL"));
    }
    Ok(out)
}

/// The mode an access ACL gives a file whose mode is `perm`, and whether the ACL says
/// no more than that mode (then it is not stored).
pub fn mode_of(acl: &[u8], perm: u32) -> Result<(u32, bool)> {
    let e = entries(acl)?;
    let get = |t| e.iter().find(|x| x.0 == t).map(|x| x.1 as u32);
    let group = get(MASK).or(get(GROUP_OBJ)).unwrap_or(0);
    let mode =
        (perm & !0o777) | get(USER_OBJ).unwrap_or(0) << 6 | group << 3 | get(OTHER).unwrap_or(0);
    Ok((mode, e.len() == 3))
}

/// The access ACL after a chmod to `perm`: owner, group class (mask, or the owning
/// group without one) and other entries take the new bits.
pub fn chmod(acl: &[u8], perm: u32) -> Result<Vec<u8>> {
    let e = entries(acl)?;
    let has_mask = e.iter().any(|x| x.0 == MASK);
    let mut out = VERSION.to_le_bytes().to_vec();
    for (tag, p, id) in e {
        let p = match tag {
            USER_OBJ => (perm >> 6) & 7,
            MASK => (perm >> 3) & 7,
            GROUP_OBJ if !has_mask => (perm >> 3) & 7,
            OTHER => perm & 7,
            _ => p as u32,
        } as u16;
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&p.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    Ok(out)
}

fn encode(e: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut out = VERSION.to_le_bytes().to_vec();
    for (tag, p, id) in e {
        out.extend_from_slice(&tag.to_le_bytes());
        out.extend_from_slice(&p.to_le_bytes());
        out.extend_from_slice(&id.to_le_bytes());
    }
    out
}

/// What a new object created with `mode` (permission bits as asked, before any umask)
/// in a directory whose default ACL is `default` gets, as `posix_acl_create` gives it
/// on Linux: the permission bits (the owner, group class and other entries of the
/// default ACL limited by `mode`'s bits; special bits kept) and the access ACL to store
/// (`None` when it says no more than those bits). `Err` for a malformed default ACL.
pub fn inherit(default: &[u8], mode: u32) -> Result<(u32, Option<Vec<u8>>)> {
    let mut e = entries(default)?;
    let has_mask = e.iter().any(|x| x.0 == MASK);
    let mut perm = mode & !0o777;
    for (tag, p, _) in e.iter_mut() {
        let shift = match *tag {
            USER_OBJ => 6,
            MASK => 3,
            GROUP_OBJ if !has_mask => 3,
            OTHER => 0,
            _ => continue,
        };
        *p &= ((mode >> shift) & 7) as u16;
        perm |= (*p as u32) << shift;
    }
    let acl = (e.len() > 3).then(|| encode(&e));
    Ok((perm, acl))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(e: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = VERSION.to_le_bytes().to_vec();
        for (t, p, i) in e {
            v.extend_from_slice(&t.to_le_bytes());
            v.extend_from_slice(&p.to_le_bytes());
            v.extend_from_slice(&i.to_le_bytes());
        }
        v
    }

    #[test]
    fn mode_and_chmod_follow_the_mask() {
        let a = acl(&[
            (USER_OBJ, 6, u32::MAX),
            (USER, 7, 1234),
            (GROUP_OBJ, 4, u32::MAX),
            (MASK, 7, u32::MAX),
            (OTHER, 4, u32::MAX),
        ]);
        assert_eq!(mode_of(&a, 0o2644).unwrap(), (0o2674, false));
        let b = chmod(&a, 0o640).unwrap();
        assert_eq!(mode_of(&b, 0o640).unwrap(), (0o640, false));
        // The named user keeps its entry; the mask limits it.
        assert!(b.windows(8).any(|w| w == [2, 0, 7, 0, 0xd2, 4, 0, 0]));
        let plain = acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 5, 0), (OTHER, 0, 0)]);
        assert_eq!(mode_of(&plain, 0o644).unwrap(), (0o750, true));
        assert_eq!(
            mode_of(&chmod(&plain, 0o701).unwrap(), 0).unwrap(),
            (0o701, true)
        );
    }

    #[test]
    fn malformed_acls_are_refused() {
        assert!(mode_of(&[], 0).is_err());
        assert!(mode_of(&[2, 0, 0, 0, 1], 0).is_err());
        assert!(mode_of(&acl(&[(USER_OBJ, 7, 0)]), 0).is_err());
        let named_without_mask = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 7, 5),
            (GROUP_OBJ, 5, 0),
            (OTHER, 0, 0),
        ]);
        assert!(mode_of(&named_without_mask, 0).is_err());
        let mut v1 = acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 5, 0), (OTHER, 0, 0)]);
        v1[0] = 1;
        assert!(mode_of(&v1, 0).is_err());
    }

    #[test]
    fn a_new_object_inherits_the_default_acl_limited_by_its_mode() {
        let d = acl(&[
            (USER_OBJ, 7, u32::MAX),
            (USER, 7, 1234),
            (GROUP_OBJ, 5, u32::MAX),
            (MASK, 7, u32::MAX),
            (OTHER, 5, u32::MAX),
        ]);
        // open(O_CREAT, 0666) in such a directory: rw for the owner, the mask (rw-)
        // limits the named user, r-- for others; no umask.
        let (perm, a) = inherit(&d, 0o666).unwrap();
        assert_eq!(perm, 0o664);
        let a = a.expect("named entries keep an access ACL");
        assert_eq!(mode_of(&a, 0).unwrap(), (0o664, false));
        assert!(a.windows(8).any(|w| w == [2, 0, 7, 0, 0xd2, 4, 0, 0]));
        // A minimal default ACL gives bits only.
        let m = acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 5, 0), (OTHER, 0, 0)]);
        assert_eq!(inherit(&m, 0o2777).unwrap(), (0o2750, None));
        assert!(inherit(&[1, 2, 3], 0o644).is_err());
    }
}
