// Declaration-only stand-in (see README.md).
#pragma once
typedef struct cublasLtContext* cublasLtHandle_t;
