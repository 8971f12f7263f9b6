//! CNI driver (placeholder until implemented).

use super::{NetworkConfig, NetworkError, PodNetwork, Readiness};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub struct Cni {}

impl Cni {
    pub fn new(_cfg: &NetworkConfig, _dir: &Path) -> Cni {
        Cni {}
    }
    pub fn setup(&self, _pod: &PodNetwork) -> Result<Vec<IpAddr>, NetworkError> {
        Err(NetworkError::NotReady("CNI is not implemented".into()))
    }
    pub fn teardown(&self, _id: &str, _netns: &Path) -> Result<(), NetworkError> {
        Ok(())
    }
    pub fn reconcile(&self, _live: &BTreeMap<String, PathBuf>) {}
    pub fn readiness(&self) -> Readiness {
        Readiness::not_ready("NoCNI", "not implemented".into())
    }
}
