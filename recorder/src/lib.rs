//! nyx-recorder: runs a machine and logs every nondeterministic input it
//! consumes (time, serial and network input, entropy, interrupt landings)
//! into a trace. The recorder itself lands with the record/replay work; this
//! crate is its place in the workspace.
