# Makefile — conveniences over setup.py: `make ext` (extension in place), `make run` (the C binary), `make test`.
PY ?= python3
CC ?= gcc
CFLAGS ?= -O3 -std=c11 -fopenmp -Wall -fno-math-errno
CPU_SRC = csrc/cpu/isa.c csrc/cpu/kernels.c csrc/cpu/isa_scalar.c csrc/cpu/isa_avx2.c csrc/cpu/isa_avx512.c

.PHONY: ext test clean
ext:
	$(PY) setup.py build_ext --inplace

test: ext
	$(PY) -m pytest -q

clean:
	rm -rf build pyllm/_C*.so pyllm/bin pyllm/lib run
