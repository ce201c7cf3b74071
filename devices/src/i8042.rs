//! The i8042 keyboard controller, as far as reset and A20 need it. (being written)
