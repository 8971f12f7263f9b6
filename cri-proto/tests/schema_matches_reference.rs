//! cri-proto/proto/cri.proto must equal the CRI v1 reference schema in every
//! service, rpc, message, enum, field name, number and type. The reference
//! (cri-api v0.36.3) sits in ../shared beside the repository in development
//! and CI; it is not part of the project.

use std::path::PathBuf;

#[test]
fn schema_matches_reference() {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let reference_dir = manifest.join("../../shared/cri-api");
    if !reference_dir.join("api.proto").exists() {
        eprintln!(
            "SKIP: reference schema {} not present (it lives beside the repository in CI)",
            reference_dir.join("api.proto").display()
        );
        return;
    }
    let ours = protox::compile(["cri.proto"], [manifest.join("proto")]).expect("compile ours");
    let theirs = protox::compile(["api.proto"], [reference_dir]).expect("compile reference");
    let strip = |mut set: protox::prost_reflect::prost_types::FileDescriptorSet| {
        assert_eq!(set.file.len(), 1);
        let mut f = set.file.remove(0);
        f.name = None;
        f.source_code_info = None;
        f
    };
    let (ours, theirs) = (strip(ours), strip(theirs));
    assert_eq!(ours.service, theirs.service, "services differ");
    assert_eq!(ours.enum_type, theirs.enum_type, "enums differ");
    assert_eq!(ours.message_type.len(), theirs.message_type.len());
    for (a, b) in ours.message_type.iter().zip(&theirs.message_type) {
        assert_eq!(a, b, "message {:?} differs", b.name);
    }
    assert_eq!(ours, theirs);
}
