//! Which KVM device Nyx opens, and whether KVM tests can run here: one
//! probe for every test of every crate.
//!
//! `NYX_KVM_DEVICE` names the device (default `/dev/kvm`); the machine
//! builder, the replayer and the CLI all open that one, so pointing it at a
//! path that does not exist imitates a host without KVM. A test that needs
//! KVM asks [`kvm_available`] first: where the device cannot be opened it
//! says so on stderr and the test returns (a skip), unless
//! `NYX_REQUIRE_KVM=1`, which turns the skip into a failure.

/// The environment variable naming the KVM device.
pub const KVM_DEVICE_ENV: &str = "NYX_KVM_DEVICE";

/// The environment variable that makes a missing KVM a test failure.
pub const REQUIRE_KVM_ENV: &str = "NYX_REQUIRE_KVM";

/// The KVM device to open: `$NYX_KVM_DEVICE`, or `/dev/kvm`.
pub fn kvm_device() -> String {
    match std::env::var(KVM_DEVICE_ENV) {
        Ok(p) if !p.is_empty() => p,
        _ => "/dev/kvm".into(),
    }
}

/// Whether `NYX_REQUIRE_KVM=1` is set.
pub fn kvm_required() -> bool {
    std::env::var(REQUIRE_KVM_ENV).as_deref() == Ok("1")
}

/// Whether KVM tests can run here: [`kvm_device`] opens read-write. When it
/// does not, the test is skipped with a line on stderr, or, under
/// `NYX_REQUIRE_KVM=1`, fails (this panics).
pub fn kvm_available() -> bool {
    let path = kvm_device();
    match probe(&path) {
        Ok(()) => true,
        Err(e) => {
            assert!(
                !kvm_required(),
                "{REQUIRE_KVM_ENV}=1 but the KVM device {path} cannot be opened read-write: {e}"
            );
            eprintln!(
                "skipped: the KVM device {path} cannot be opened read-write ({e}); set {REQUIRE_KVM_ENV}=1 to make this a failure"
            );
            false
        }
    }
}

/// Opens `path` read-write and closes it again.
fn probe(path: &str) -> std::io::Result<()> {
    std::fs::OpenOptions::new().read(true).write(true).open(path).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_device_is_an_error_and_dev_null_opens() {
        assert!(probe("/nonexistent/kvm").is_err());
        assert!(probe("/dev/null").is_ok());
    }
}
