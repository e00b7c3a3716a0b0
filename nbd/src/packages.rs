//! Which package provides a program this crate starts, named in the error
//! when the program cannot be started: the name depends on the
//! distribution and, for `qemu-storage-daemon`, on QEMU's version (Debian
//! moved it from `qemu-system-common` to `qemu-utils` in 8.0.2, so Debian
//! 12's own QEMU 7.2 has it in `qemu-system-common`, and bookworm-backports'
//! QEMU 10.0 in `qemu-utils`).

use std::time::Duration;

use tokio::process::Command;

/// The package that provides `program` on this machine, as an installer
/// would name it: read from `/etc/os-release` and `qemu-img --version`.
pub(crate) async fn provider(program: &str) -> String {
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap_or_default();
    let qemu = if program.starts_with("qemu-") { qemu_version().await } else { None };
    provider_on(program, &os_release, qemu)
}

/// The installed QEMU's version (major, minor), from `qemu-img --version`
/// ("qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2...)"); none without
/// qemu-img.
async fn qemu_version() -> Option<(u32, u32)> {
    let mut command = Command::new("qemu-img");
    command.arg("--version").stdin(std::process::Stdio::null()).kill_on_drop(true);
    let output = tokio::time::timeout(Duration::from_secs(5), command.output()).await.ok()?.ok()?;
    parse_qemu_version(&String::from_utf8_lossy(&output.stdout))
}

fn parse_qemu_version(text: &str) -> Option<(u32, u32)> {
    let version = text.split_whitespace().skip_while(|word| *word != "version").nth(1)?;
    let mut numbers = version.split('.').map(|number| number.parse::<u32>().ok());
    Some((numbers.next()??, numbers.next()??))
}

/// A field of os-release(5), unquoted.
fn os_field<'a>(os_release: &'a str, key: &str) -> &'a str {
    os_release
        .lines()
        .find_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .map(|value| value.trim().trim_matches('"').trim_matches('\''))
        .unwrap_or("")
}

/// The distribution families whose package names this knows.
#[derive(Debug, PartialEq, Eq)]
enum Family {
    /// Debian and Ubuntu, with the release's (major, minor) version
    /// (12 is (12, 0), 22.04 is (22, 4)), if known.
    Debian {
        ubuntu: bool,
        release: Option<(u32, u32)>,
    },
    Fedora,
    Other,
}

fn family(os_release: &str) -> Family {
    let id = os_field(os_release, "ID");
    let like = os_field(os_release, "ID_LIKE");
    let version = os_field(os_release, "VERSION_ID");
    let release = version.split_once('.').map_or((version, "0"), |(major, minor)| (major, minor));
    let release = release.0.parse().ok().zip(release.1.parse().ok());
    let is = |name: &str| id == name || like.split_whitespace().any(|word| word == name);
    if id == "ubuntu" || (is("ubuntu") && id != "debian") {
        // Derivatives (Mint, Pop) carry their own VERSION_ID: unknown.
        Family::Debian { ubuntu: true, release: if id == "ubuntu" { release } else { None } }
    } else if is("debian") {
        Family::Debian { ubuntu: false, release: if id == "debian" { release } else { None } }
    } else if id == "fedora" {
        Family::Fedora
    } else {
        Family::Other
    }
}

/// `provider` without looking at the machine: `os_release` is the text of
/// `/etc/os-release`, `qemu` the installed QEMU's (major, minor).
fn provider_on(program: &str, os_release: &str, qemu: Option<(u32, u32)>) -> String {
    let family = family(os_release);
    match (program, family) {
        ("setpriv", _) => "util-linux".into(),
        ("qemu-storage-daemon", Family::Debian { ubuntu, release }) => {
            // Debian moved the daemon to qemu-utils in 8.0.2; Ubuntu's
            // packaging follows Debian's (23.10 has QEMU 8.0.4).
            // Whether the QEMU is (or would be) older than 8: unknown for a
            // derivative with no QEMU installed yet.
            let old = match (qemu, release) {
                (Some((major, _)), _) => Some(major < 8),
                (None, Some(release)) if ubuntu => Some(release < (23, 10)),
                (None, Some(release)) => Some(release < (13, 0)),
                // Debian testing and unstable have no VERSION_ID.
                (None, None) if os_field(os_release, "ID") == "debian" => Some(false),
                (None, None) => None,
            };
            match (old, qemu) {
                (Some(true), Some((major, minor))) => format!("qemu-system-common, which ships it with QEMU {major}.{minor}"),
                (Some(true), None) if !ubuntu => {
                    "qemu-system-common (Debian 12's QEMU 7.2; qemu-utils from bookworm-backports ships it too)".into()
                }
                (Some(true), None) => "qemu-system-common".into(),
                (Some(false), _) => "qemu-utils".into(),
                (None, _) => "qemu-utils (qemu-system-common before QEMU 8)".into(),
            }
        }
        ("qemu-storage-daemon", Family::Fedora) => "qemu-storage-daemon".into(),
        ("qemu-storage-daemon", Family::Other) => {
            "the package of your distribution that ships it (qemu-utils, or qemu-system-common before QEMU 8, on Debian and Ubuntu)".into()
        }
        (_, Family::Debian { .. }) => "qemu-utils".into(),
        (_, Family::Fedora) => "qemu-img".into(),
        (_, Family::Other) => "QEMU's tools (qemu-utils on Debian and Ubuntu, qemu-img on Fedora)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN_12: &str = "PRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\nNAME=\"Debian GNU/Linux\"\nVERSION_ID=\"12\"\nVERSION=\"12 (bookworm)\"\nVERSION_CODENAME=bookworm\nID=debian\n";
    const DEBIAN_13: &str = "PRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\nVERSION_ID=\"13\"\nID=debian\n";
    const DEBIAN_SID: &str = "PRETTY_NAME=\"Debian GNU/Linux trixie/sid\"\nID=debian\n";
    const UBUNTU_22: &str = "NAME=\"Ubuntu\"\nVERSION_ID=\"22.04\"\nID=ubuntu\nID_LIKE=debian\n";
    const UBUNTU_24: &str = "NAME=\"Ubuntu\"\nVERSION_ID=\"24.04\"\nID=ubuntu\nID_LIKE=debian\n";
    const MINT: &str = "NAME=\"Linux Mint\"\nVERSION_ID=\"21.3\"\nID=linuxmint\nID_LIKE=\"ubuntu debian\"\n";
    const FEDORA: &str = "NAME=\"Fedora Linux\"\nVERSION_ID=40\nID=fedora\n";
    const ARCH: &str = "NAME=\"Arch Linux\"\nID=arch\n";

    #[test]
    fn the_storage_daemon_is_named_by_the_package_that_ships_it_there() {
        let daemon = |os_release, qemu| provider_on("qemu-storage-daemon", os_release, qemu);
        // Debian 12's own QEMU 7.2, and bookworm-backports' 10.0.
        assert_eq!(daemon(DEBIAN_12, Some((7, 2))), "qemu-system-common, which ships it with QEMU 7.2");
        assert_eq!(daemon(DEBIAN_12, Some((10, 0))), "qemu-utils");
        // No QEMU at all: what installing the release's own would bring.
        assert!(daemon(DEBIAN_12, None).starts_with("qemu-system-common (Debian 12's QEMU 7.2;"), "{}", daemon(DEBIAN_12, None));
        assert_eq!(daemon(DEBIAN_13, None), "qemu-utils");
        assert_eq!(daemon(DEBIAN_SID, None), "qemu-utils");
        assert_eq!(daemon(UBUNTU_22, None), "qemu-system-common");
        assert_eq!(daemon(UBUNTU_22, Some((6, 2))), "qemu-system-common, which ships it with QEMU 6.2");
        assert_eq!(daemon(UBUNTU_24, None), "qemu-utils");
        assert_eq!(daemon(MINT, Some((6, 2))), "qemu-system-common, which ships it with QEMU 6.2");
        assert_eq!(daemon(MINT, None), "qemu-utils (qemu-system-common before QEMU 8)");
        assert_eq!(daemon(FEDORA, None), "qemu-storage-daemon");
        assert!(daemon(ARCH, None).contains("qemu-system-common before QEMU 8"));
        assert!(daemon("", Some((9, 0))).starts_with("the package of your distribution"));
    }

    #[test]
    fn the_other_programs_are_named_by_their_packages() {
        for os_release in [DEBIAN_12, DEBIAN_13, UBUNTU_22] {
            for qemu in [None, Some((7, 2)), Some((10, 0))] {
                assert_eq!(provider_on("qemu-nbd", os_release, qemu), "qemu-utils");
                assert_eq!(provider_on("qemu-img", os_release, qemu), "qemu-utils");
            }
        }
        assert_eq!(provider_on("qemu-nbd", FEDORA, None), "qemu-img");
        assert_eq!(provider_on("setpriv", DEBIAN_12, None), "util-linux");
        assert!(provider_on("qemu-img", ARCH, None).contains("qemu-utils on Debian"));
    }

    #[test]
    fn qemu_img_versions_are_read() {
        assert_eq!(
            parse_qemu_version("qemu-img version 10.0.2 (Debian 1:10.0.2+ds-2+deb13u1~bpo12+1)\nCopyright (c) 2003-2025 Fabrice Bellard\n"),
            Some((10, 0))
        );
        assert_eq!(parse_qemu_version("qemu-img version 7.2.15 (Debian 1:7.2+dfsg-7+deb12u15)\n"), Some((7, 2)));
        assert_eq!(parse_qemu_version("something else\n"), None);
    }

    #[tokio::test]
    async fn this_machine_names_a_package() {
        // Whatever the machine, a name comes back, and on Debian it is
        // the package that holds the daemon here.
        let named = provider("qemu-storage-daemon").await;
        assert!(!named.is_empty());
        if let Ok(output) = std::process::Command::new("dpkg").args(["-S", "/usr/bin/qemu-storage-daemon"]).output() {
            let text = String::from_utf8_lossy(&output.stdout);
            if let Some((package, _)) = text.trim().split_once(':') {
                assert!(named.starts_with(package), "dpkg says {package}, the error would say {named}");
            }
        }
    }
}
