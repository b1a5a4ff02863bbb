//! drop-net
