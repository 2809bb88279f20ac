// Minimal stand-in for ggml-backend.h (see ggml.h here).
#pragma once

#include "ggml.h"

#define GGML_BACKEND_API
