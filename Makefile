# Makefile — conveniences over setup.py: `make ext` (extension in place), `make run` (the C binary), `make test`.
PY ?= python3
CC ?= gcc
CFLAGS ?= -O3 -std=c11 -fopenmp -Wall -fno-math-errno
CPU_SRC = csrc/cpu/isa.c csrc/cpu/kernels.c csrc/cpu/isa_scalar.c csrc/cpu/isa_avx2.c csrc/cpu/isa_avx512.c

RUN_SRC = csrc/run.c csrc/tokenizer.c csrc/model_file.c $(CPU_SRC)

.PHONY: ext test clean run-asan
ext:
	$(PY) setup.py build_ext --inplace

test: ext
	$(PY) -m pytest -q

# The standalone binary, from the same sources setup.py links into pyllm/bin/pyllm-run.
run: $(RUN_SRC) csrc/*.h csrc/cpu/*.h
	$(CC) $(CFLAGS) -Icsrc $(RUN_SRC) -o run -lm

# The same with AddressSanitizer + UndefinedBehaviorSanitizer (slow; for hunting memory bugs).
run-asan: $(RUN_SRC)
	$(CC) -std=c11 -O1 -g -fopenmp -fsanitize=address,undefined -fno-sanitize-recover=undefined -Icsrc \
		$(RUN_SRC) -o run-asan -lm

clean:
	rm -rf build pyllm/_C*.so pyllm/bin pyllm/lib run run-asan
