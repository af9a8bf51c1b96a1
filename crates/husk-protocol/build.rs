//! Generates the agent protocol (messages + async ttrpc client and server)
//! with ttrpc-codegen's pure-Rust parser: no protoc needed.

use std::path::{Path, PathBuf};

use ttrpc_codegen::{Codegen, Customize, ProtobufCustomize};

const PROTOS: &[&str] = &["protos/agent.proto"];

fn main() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    println!("cargo:rerun-if-changed=protos");

    Codegen::new()
        .out_dir(&out)
        .inputs(PROTOS)
        .include("protos")
        .rust_protobuf()
        .customize(Customize {
            async_all: true,
            ..Default::default()
        })
        .rust_protobuf_customize(ProtobufCustomize::default().gen_mod_rs(false))
        .run()
        .expect("ttrpc-codegen failed on protos/");

    strip_inner_attributes(&out);
}

/// Generated files start with `#![...]` / `//!` lines, which are rejected
/// when the file is `include!`d into a module: comment them out.
fn strip_inner_attributes(dir: &Path) {
    for entry in std::fs::read_dir(dir).expect("read OUT_DIR") {
        let path = entry.expect("read OUT_DIR entry").path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        let text = std::fs::read_to_string(&path).expect("read generated file");
        let fixed: String = text
            .lines()
            .map(|l| {
                if l.starts_with("#![") || l.starts_with("//!") {
                    format!("// {l}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(&path, fixed).expect("write generated file");
    }
}
