//! Who a child process runs as: a root daemon starts each job's processes
//! (intake checks, workers) as the job's owner, with the owner's uid, primary
//! group and supplementary groups — what a login gives that user (`initgroups`),
//! so a dataset readable by one of the owner's groups stays readable.
//!
//! `std::process::Command::uid/gid` would drop the supplementary groups, and
//! its `pre_exec` runs after that change, too late to set them: so the whole
//! change happens here, in `pre_exec`, in the order that works (groups, gid,
//! uid).

use std::ffi::CStr;

/// A uid with its primary and supplementary groups.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<libc::gid_t>,
    /// The user's home folder, for `HOME` (the user database's; `/` without one).
    pub home: std::path::PathBuf,
}

/// The group of a uid the user database does not know: the kernel's
/// overflow group ("nogroup"), which grants nothing.
pub const UNKNOWN_USER_GID: u32 = 65534;

impl Identity {
    /// `uid` as the user database knows it: its login groups (`getgrouplist`
    /// from its passwd entry's primary group), and as primary group
    /// `file_gid` only if the user is a member of it, else its own primary
    /// group.  A file's group says nothing about its owner: a file created in
    /// a setgid folder (or `chgrp`ed by a member) carries a group its owner
    /// may not belong to, and a job must not run with it.  A uid without a
    /// passwd entry runs with [`UNKNOWN_USER_GID`] alone.
    pub fn of(uid: u32, file_gid: u32) -> Self {
        match user_entry(uid) {
            Some((name, primary, home)) => {
                let groups = group_list(&name, primary);
                let gid = if groups.contains(&file_gid) {
                    file_gid
                } else {
                    primary
                };
                Self {
                    uid,
                    gid,
                    groups,
                    home,
                }
            }
            None => Self {
                uid,
                gid: UNKNOWN_USER_GID,
                groups: vec![UNKNOWN_USER_GID],
                home: "/".into(),
            },
        }
    }

    /// Become this identity.  For `pre_exec`: only async-signal-safe calls,
    /// no allocation.
    ///
    /// # Safety
    /// Call only in a freshly forked child (the change applies to the calling
    /// process and must not race other threads).
    pub unsafe fn assume(&self) -> std::io::Result<()> {
        let check = |r: libc::c_int| {
            if r != 0 {
                Err(std::io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        check(libc::setgroups(self.groups.len(), self.groups.as_ptr()))?;
        check(libc::setgid(self.gid))?;
        check(libc::setuid(self.uid))
    }
}

/// The name of `uid` as the system's user database (NSS: files, LDAP,
/// SSSD…) knows it.
pub fn name_of(uid: u32) -> Option<String> {
    Some(user_name(uid)?.to_string_lossy().into_owned())
}

/// The uid of a user name, from the system's user database (NSS).
pub fn uid_named(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwnam_r reads the NUL-terminated name and writes into pwd
    // and buf, both owned here and sized as passed.
    let r = unsafe {
        libc::getpwnam_r(
            name.as_ptr(),
            &mut pwd,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    (r == 0 && !found.is_null()).then_some(pwd.pw_uid)
}

/// The gid of a group name, from the system's group database (NSS).
pub(crate) fn gid_named(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    let mut buf = vec![0 as libc::c_char; 64 << 10];
    let mut grp: libc::group = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::group = std::ptr::null_mut();
    // SAFETY: getgrnam_r reads the NUL-terminated name and writes into grp
    // and buf, both owned here and sized as passed.
    let r = unsafe {
        libc::getgrnam_r(
            name.as_ptr(),
            &mut grp,
            buf.as_mut_ptr(),
            buf.len(),
            &mut found,
        )
    };
    (r == 0 && !found.is_null()).then_some(grp.gr_gid)
}

fn user_name(uid: u32) -> Option<std::ffi::CString> {
    user_entry(uid).map(|(name, _, _)| name)
}

/// (name, primary gid, home) of `uid` in the user database.
fn user_entry(uid: u32) -> Option<(std::ffi::CString, u32, std::path::PathBuf)> {
    use std::os::unix::ffi::OsStrExt;
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into pwd and buf, both owned here and sized as passed.
    let r = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
    if r != 0 || found.is_null() {
        return None;
    }
    // SAFETY: on success pw_name and pw_dir point into buf, NUL-terminated.
    let name = unsafe { CStr::from_ptr(pwd.pw_name) }.to_owned();
    let home = if pwd.pw_dir.is_null() {
        std::path::PathBuf::from("/")
    } else {
        let dir = unsafe { CStr::from_ptr(pwd.pw_dir) };
        std::path::PathBuf::from(std::ffi::OsStr::from_bytes(dir.to_bytes()))
    };
    Some((name, pwd.pw_gid, home))
}

fn group_list(name: &CStr, gid: u32) -> Vec<libc::gid_t> {
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let asked = n;
        // SAFETY: groups holds n entries; getgrouplist writes at most n and sets n.
        let r = unsafe { libc::getgrouplist(name.as_ptr(), gid, groups.as_mut_ptr(), &mut n) };
        if r >= 0 {
            groups.truncate(n as usize);
            return groups;
        }
        if n <= asked {
            n = asked * 2;
        }
        if n > 1 << 16 {
            return vec![gid];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_come_from_the_user_database_not_from_the_file() {
        let root = Identity::of(0, 0);
        assert!(root.groups.contains(&0), "{root:?}");
        assert_eq!(root.gid, 0);
        // A file group root is not in (as a setgid folder would give): not taken.
        let stray = 4_242_424;
        let root_in_stray = Identity::of(0, stray);
        assert_eq!(root_in_stray.gid, 0, "{root_in_stray:?}");
        assert!(!root_in_stray.groups.contains(&stray));
        // A uid the user database does not know gets the overflow group alone,
        // whatever its file says.
        let unknown = Identity::of(4_000_000, 4_000_001);
        assert_eq!(unknown.gid, UNKNOWN_USER_GID);
        assert_eq!(unknown.groups, vec![UNKNOWN_USER_GID]);
    }
}
