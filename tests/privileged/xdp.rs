//! placeholder
use drop_tests::Test;
pub const TESTS: &[Test] = &[];
