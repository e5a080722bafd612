// Stand-in for Gloo's <gloo/algorithm.h>: the PyTorch wheel ships no Gloo
// headers, and ProcessGroupGloo.hpp only needs the names declared in
// gloo/context.h (which says why these stand-ins are sound).
#pragma once
#include <gloo/context.h>
