//! nyx-gdb: the gdb remote-protocol target over a live machine or a replay
//! session. The stub itself lands with the gdb work; this crate is its place
//! in the workspace.
