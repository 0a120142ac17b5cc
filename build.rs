//! Compiles `proto/` with protox (a pure-Rust protobuf compiler, so no system
//! `protoc` is needed) and tonic-prost-build.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "gsdk/admin.proto",
    "gsdk/card.proto",
    "gsdk/connect.proto",
    "gsdk/err.proto",
    "gsdk/event.proto",
    "gsdk/finger.proto",
    "gsdk/tna.proto",
    "gsdk/user.proto",
    "usersync/schema_v16.proto",
    "usersync/schema_v18.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from("proto");
    let files: Vec<PathBuf> = PROTOS.iter().map(|p| root.join(p)).collect();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, [&root])?;

    let mut config = tonic_prost_build::Config::new();
    // Type names let `prost_types::Any::from_msg` produce the
    // `type.googleapis.com/<package>.<Message>` URLs that gRPC peers expect.
    config.enable_type_names();
    config.type_name_domain(["."], "type.googleapis.com");

    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // The generated `connect` constructor clashes with Connect.Connect;
        // channels are built by `gateway::channel` anyway.
        .build_transport(false)
        .include_file("protos.rs")
        .compile_fds_with_config(fds, config)?;
    Ok(())
}
