// Declaration-only stand-in (see README.md): the NCCL shim never calls cuBLAS.
#pragma once
typedef struct cublasContext* cublasHandle_t;
typedef enum { CUBLAS_STATUS_SUCCESS = 0 } cublasStatus_t;
