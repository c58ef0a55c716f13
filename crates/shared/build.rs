//! Compiles the protobuf contract in `proto/` with a vendored `protoc`, so a
//! build never needs a system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = ["policy.proto", "sync.proto", "audit.proto", "admin.proto"]
        .map(|f| root.join("sentinel/v1").join(f));
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);

    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("sentinel_descriptor.bin"))
        .compile_with_config(config, &files, std::slice::from_ref(&root))?;
    println!("cargo:rerun-if-changed={}", root.display());
    Ok(())
}
