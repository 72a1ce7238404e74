// io/testing_hooks.h — private seams for the I/O layer's own tests.
//
// Linux 6.6 taught tmpfs to accept O_DIRECT, so on current kernels no
// ordinary file system refuses it and the buffered fallback of SwapFile and
// probe_direct_io() cannot be reached by choosing a directory. With
// refuse_direct_io set, both behave exactly as on a file system that fails
// O_DIRECT opens with EINVAL (tmpfs before 6.6). Off by default; never set
// outside tests.
//
// Thread-safety: an atomic flag; set it before creating the objects under test.
#pragma once

namespace strata::io::testing {

void set_refuse_direct_io(bool refuse);
bool refuse_direct_io();

}  // namespace strata::io::testing
