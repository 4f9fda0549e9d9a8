//! Users and groups read from `/etc/passwd` and `/etc/group` themselves (formats of
//! passwd(5) and group(5)), not through the C library: glibc resolves `getpwnam`,
//! `getpwuid` and `getgrouplist` through NSS, whose modules a statically linked agent
//! cannot load. So the agent needs nothing at run time but the kernel and these files.
//!
//! Readers of these files (glibc's `files` NSS module, `pwck`) skip what they cannot
//! use, and so does this one: blank lines, comments (`#`), NIS compatibility entries
//! (`+` or `-` first), lines without the right number of fields, with an empty name
//! or a uid or gid that is not a number. The first entry that matches wins.

use std::io;
use std::path::{Path, PathBuf};

use nix::unistd::{Gid, Uid};

/// The user database.
pub(super) const PASSWD: &str = "/etc/passwd";
/// The group database.
pub(super) const GROUP: &str = "/etc/group";

/// One user's entry of `/etc/passwd`: what a release running as it needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Account {
    /// Login name.
    pub(super) name: String,
    /// User id.
    pub(super) uid: Uid,
    /// Primary group id.
    pub(super) gid: Gid,
    /// Home directory.
    pub(super) dir: PathBuf,
}

/// Which user: a login name, or a numeric uid (as a `Start`'s `user` may give it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wanted<'a> {
    /// A login name.
    Name(&'a str),
    /// A user id.
    Uid(u32),
}

impl<'a> Wanted<'a> {
    /// A uid when `text` is a decimal number, a name otherwise.
    pub(super) fn parse(text: &'a str) -> Self {
        text.parse().map_or(Wanted::Name(text), Wanted::Uid)
    }
}

/// The first entry of `passwd` (the text of a passwd(5) file) that `wanted` names.
pub(super) fn find_user(passwd: &str, wanted: Wanted<'_>) -> Option<Account> {
    entries(passwd, 7)
        .filter_map(|fields| {
            let (uid, gid) = (fields[2].parse().ok()?, fields[3].parse().ok()?);
            Some(Account {
                name: fields[0].to_string(),
                uid: Uid::from_raw(uid),
                gid: Gid::from_raw(gid),
                dir: PathBuf::from(fields[5]),
            })
        })
        .find(|account| match wanted {
            Wanted::Name(name) => account.name == name,
            Wanted::Uid(uid) => account.uid.as_raw() == uid,
        })
}

/// The groups `user` is in, as `getgrouplist(3)` gives them: `primary` first, then each
/// group of `group` (the text of a group(5) file) whose member list names `user`, each
/// gid once.
pub(super) fn groups_of(group: &str, user: &str, primary: Gid) -> Vec<Gid> {
    let mut groups = vec![primary];
    let member = entries(group, 4)
        .filter(|fields| fields[3].split(',').any(|m| m.trim() == user))
        .filter_map(|fields| fields[2].parse().ok().map(Gid::from_raw));
    for gid in member {
        if !groups.contains(&gid) {
            groups.push(gid);
        }
    }
    groups
}

/// Reads a database, such as [`PASSWD`]; a line that is not UTF-8 becomes one that no
/// reader uses, so the lines around it stay usable.
pub(super) fn read(path: &Path) -> io::Result<String> {
    let bytes = std::fs::read(path)?;
    Ok(bytes
        .split(|b| *b == b'\n')
        .map(|line| std::str::from_utf8(line).unwrap_or("#"))
        .collect::<Vec<_>>()
        .join("\n"))
}

/// The usable lines of a database whose entries have `count` colon-separated fields,
/// split into them.
fn entries(text: &str, count: usize) -> impl Iterator<Item = Vec<&str>> {
    text.lines()
        .filter(|line| {
            let first = line.trim_start().chars().next();
            !matches!(first, None | Some('#' | '+' | '-'))
        })
        .map(|line| line.split(':').collect::<Vec<_>>())
        .filter(move |fields| fields.len() == count && !fields[0].is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD_TEXT: &str = "\
# the system's users
root:x:0:0:root:/root:/bin/bash

  # an indented comment
+nis:x:7:7:::
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
short:x:5:5:too few fields:/home/short
long:x:6:6:one:field:too:many
baduid:x:abc:100::/home/baduid:/bin/sh
badgid:x:100:-1::/home/badgid:/bin/sh
:x:101:101:no name:/:/bin/sh
app:x:4242:4243:The app:/home/app:/bin/sh
app:x:4300:4300:a later duplicate:/home/other:/bin/sh
";

    fn account(name: &str, uid: u32, gid: u32, dir: &str) -> Account {
        Account {
            name: name.into(),
            uid: Uid::from_raw(uid),
            gid: Gid::from_raw(gid),
            dir: dir.into(),
        }
    }

    #[test]
    fn a_user_is_found_by_name_or_by_uid_the_first_entry_winning() {
        let app = account("app", 4242, 4243, "/home/app");
        assert_eq!(
            find_user(PASSWD_TEXT, Wanted::Name("app")),
            Some(app.clone())
        );
        assert_eq!(find_user(PASSWD_TEXT, Wanted::Uid(4242)), Some(app));
        let root = account("root", 0, 0, "/root");
        assert_eq!(find_user(PASSWD_TEXT, Wanted::parse("0")), Some(root));
        let daemon = find_user(PASSWD_TEXT, Wanted::parse("daemon")).expect("daemon");
        assert_eq!(daemon.dir, PathBuf::from("/usr/sbin"));
        assert_eq!(
            find_user(PASSWD_TEXT, Wanted::Uid(4300)).unwrap().name,
            "app"
        );
    }

    #[test]
    fn a_name_is_a_uid_only_when_it_is_a_decimal_number() {
        assert_eq!(Wanted::parse("4242"), Wanted::Uid(4242));
        assert_eq!(Wanted::parse("app"), Wanted::Name("app"));
        assert_eq!(Wanted::parse("-1"), Wanted::Name("-1"));
        assert_eq!(Wanted::parse("99999999999"), Wanted::Name("99999999999"));
    }

    #[test]
    fn comments_blank_and_malformed_lines_are_skipped() {
        for name in [
            "nis",
            "+nis",
            "short",
            "long",
            "baduid",
            "badgid",
            "",
            "# the system's users",
        ] {
            assert_eq!(find_user(PASSWD_TEXT, Wanted::Name(name)), None, "{name:?}");
        }
        for uid in [5, 6, 7, 100, 101] {
            assert_eq!(find_user(PASSWD_TEXT, Wanted::Uid(uid)), None, "uid {uid}");
        }
        assert_eq!(find_user("", Wanted::Name("root")), None);
        assert_eq!(find_user("nobody", Wanted::Name("nobody")), None);
    }

    #[test]
    fn supplementary_groups_are_those_naming_the_user_after_the_primary_one() {
        let group = "\
# groups
root:x:0:
adm:x:4:syslog,app
app:x:4243:
ssl-cert:x:110: app , other
apps:x:4243:app
+nis:x:900:app
broken:x:111
badgid:x:abc:app
appendix:x:120:application,app2
";
        let gids = |user| groups_of(group, user, Gid::from_raw(4243));
        let raw: Vec<u32> = gids("app").iter().map(|g| g.as_raw()).collect();
        assert_eq!(raw, [4243, 4, 110]);
        assert_eq!(gids("nobody"), [Gid::from_raw(4243)]);
        assert_eq!(groups_of("", "app", Gid::from_raw(7)), [Gid::from_raw(7)]);
    }

    #[test]
    fn a_line_that_is_not_utf8_spoils_only_itself() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("passwd");
        let text = b"bad\xff:x:9:9::/:/bin/sh\napp:x:4242:4243::/home/app:/bin/sh\n";
        std::fs::write(&path, text).expect("write");
        let read = read(&path).expect("read");
        assert_eq!(find_user(&read, Wanted::Uid(9)), None);
        assert_eq!(find_user(&read, Wanted::Uid(4242)).unwrap().name, "app");
    }
}
