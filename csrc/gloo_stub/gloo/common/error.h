// Stand-in for Gloo's <gloo/common/error.h>: the PyTorch wheel ships no Gloo
// headers, and ProcessGroupGloo.hpp needs nothing from this one (see
// gloo/context.h for why these stand-ins are sound).
#pragma once
