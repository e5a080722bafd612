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
}

impl Identity {
    /// `uid` with primary group `gid` and the groups the user database lists
    /// for that user; a uid without a passwd entry gets `gid` alone.
    pub fn of(uid: u32, gid: u32) -> Self {
        let groups = user_name(uid)
            .map(|name| group_list(&name, gid))
            .unwrap_or_else(|| vec![gid]);
        Self { uid, gid, groups }
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

fn user_name(uid: u32) -> Option<std::ffi::CString> {
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    // SAFETY: getpwuid_r writes into pwd and buf, both owned here and sized as passed.
    let r = unsafe { libc::getpwuid_r(uid, &mut pwd, buf.as_mut_ptr(), buf.len(), &mut found) };
    if r != 0 || found.is_null() {
        return None;
    }
    // SAFETY: on success pw_name points into buf, NUL-terminated.
    Some(unsafe { CStr::from_ptr(pwd.pw_name) }.to_owned())
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
    fn root_has_its_groups_and_an_unknown_uid_its_gid_alone() {
        let root = Identity::of(0, 0);
        assert!(root.groups.contains(&0), "{root:?}");
        let nobody = Identity::of(4_000_000, 4_000_001);
        assert_eq!(nobody.groups, vec![4_000_001]);
    }
}
