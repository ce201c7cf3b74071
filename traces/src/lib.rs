//! nyx-trace: the one container format used by traces, snapshots and the
//! migration stream.
