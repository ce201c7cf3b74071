//! The 8259A programmable interrupt controller pair. (being written)
