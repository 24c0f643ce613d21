//! Host networking the VMs use. For now: tearing down a VM's tap, which outlives its VMM.

use std::{ffi::OsString, path::PathBuf};

use super::{HostError, command};

/// What the host offers for VM networking.
#[tonic::async_trait]
pub trait Network: Send + Sync + std::fmt::Debug {
    /// Deletes a tap interface; one already gone is not an error.
    async fn delete_tap(&self, name: &str) -> Result<(), HostError>;
}

/// Linux networking through iproute2, optionally inside a network namespace.
#[derive(Debug, Clone)]
pub struct LinuxNetwork {
    ip: PathBuf,
    netns: Option<String>,
}

impl LinuxNetwork {
    /// Uses `ip` in the daemon's own network namespace.
    pub fn new(ip: PathBuf) -> Self {
        Self { ip, netns: None }
    }

    /// Uses `ip -n NETNS`: every interface lives in that namespace.
    pub fn in_netns(ip: PathBuf, netns: String) -> Self {
        Self { ip, netns: Some(netns) }
    }

    fn args(&self, rest: &[&str]) -> Vec<OsString> {
        let mut args: Vec<OsString> = Vec::new();
        if let Some(netns) = &self.netns {
            args.extend(["-n".into(), netns.into()]);
        }
        args.extend(rest.iter().map(OsString::from));
        args
    }
}

#[tonic::async_trait]
impl Network for LinuxNetwork {
    async fn delete_tap(&self, name: &str) -> Result<(), HostError> {
        match command::run(&self.ip, &self.args(&["link", "del", "dev", name])).await {
            Err(HostError::Command(failed)) if failed.stderr.contains("Cannot find device") => Ok(()),
            other => other.map(drop),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A network namespace for one test, deleted when dropped.
    struct TestNetns(String);

    impl TestNetns {
        fn new() -> Self {
            let name = format!("banger-test-{}", std::process::id());
            let status = std::process::Command::new("ip").args(["netns", "add", &name]).status().expect("ip netns add");
            assert!(status.success(), "ip netns add {name}");
            Self(name)
        }

        fn link_exists(&self, name: &str) -> bool {
            std::process::Command::new("ip")
                .args(["-n", &self.0, "link", "show", "dev", name])
                .output()
                .expect("ip link show")
                .status
                .success()
        }
    }

    impl Drop for TestNetns {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }

    #[tokio::test]
    async fn deletes_a_real_tap_inside_a_test_namespace_and_tolerates_a_missing_one() {
        let netns = TestNetns::new();
        let created = std::process::Command::new("ip")
            .args(["-n", &netns.0, "tuntap", "add", "dev", "bgtap0", "mode", "tap"])
            .status()
            .expect("ip tuntap");
        assert!(created.success());
        assert!(netns.link_exists("bgtap0"));
        let network = LinuxNetwork::in_netns("ip".into(), netns.0.clone());
        network.delete_tap("bgtap0").await.expect("delete");
        assert!(!netns.link_exists("bgtap0"));
        network.delete_tap("bgtap0").await.expect("a missing tap is fine");
    }
}
