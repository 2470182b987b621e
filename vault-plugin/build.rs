//! Compiles the go-plugin and OpenBao plugin protocol definitions in
//! `proto/` with protox (no system `protoc`).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/plugin/grpc_broker.proto",
        "proto/plugin/grpc_controller.proto",
        "proto/plugin/grpc_stdio.proto",
        "proto/pb/backend.proto",
        "proto/logical/version.proto",
    ];
    for f in &files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        // Requests carry parameters (a value to import), replies carry
        // credentials, storage entries carry the backend token: their Debug
        // is written by hand in proto.rs and prints none of them.
        .skip_debug(["pb.Request", "pb.Response", "pb.StorageEntry"])
        .compile_fds(fds)?;
    Ok(())
}
