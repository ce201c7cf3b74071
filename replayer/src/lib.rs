//! nyx-replayer: re-executes a trace, verifies every sync point, seeks and
//! steps backwards. The replayer itself lands with the record/replay work;
//! this crate is its place in the workspace.
