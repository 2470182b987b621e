//! Compiles `rekey/v1/*.proto` with protox (a pure-Rust protobuf compiler), so
//! no system `protoc` is needed, and keeps the encoded descriptor set for
//! gRPC server reflection.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["rekey/v1/rekey.proto"];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["."])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("rekey_v1_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        // Values must never reach a log through a derived Debug; lib.rs
        // implements a redacting one.
        .skip_debug(["rekey.v1.SecretValue", "rekey.v1.StructuredValue"])
        .compile_fds(fds)?;
    Ok(())
}
