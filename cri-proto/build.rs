// Compiles the CRI schema with protox (pure Rust), so building berth needs no protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let fds = protox::compile(["cri.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=proto/cri.proto");
    Ok(())
}
