/* Classify images with a graft artifact from C.
 *
 * Linked dynamically:
 *   cc -O2 -I runtime/include runtime/examples/c/classify.c -L target/release -lgraft_runtime \
 *      -Wl,-rpath,target/release -o classify
 * or statically (one self-contained executable; the system libraries Rust's standard library
 * needs come after the archive):
 *   cc -O2 -I runtime/include runtime/examples/c/classify.c target/release/libgraft_runtime.a \
 *      -lpthread -ldl -lm -lrt -lgcc_s -o classify
 *   ./classify model.graft bee.jpg ant.png
 *
 * The model is read into memory and loaded from there (as from flash, without a filesystem
 * path). Prints one line per image file ("path: label p, label p", like graft-run), then, for a
 * synthetic 64x48 gradient passed as a raw BGRA buffer with padded rows, its top class and its
 * logits, and the model's input size.
 * Exit status: 0 ok, 1 an image or the model failed, 2 usage.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "graft.h"

/* The whole file at `path` in a malloc'd buffer, its size in `len`; NULL on failure. */
static uint8_t *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (f == NULL) {
        return NULL;
    }
    uint8_t *data = NULL;
    if (fseek(f, 0, SEEK_END) == 0) {
        long size = ftell(f);
        if (size >= 0 && fseek(f, 0, SEEK_SET) == 0) {
            data = malloc(size > 0 ? (size_t)size : 1);
            if (data != NULL && fread(data, 1, (size_t)size, f) != (size_t)size) {
                free(data);
                data = NULL;
            }
            *len = (size_t)size;
        }
    }
    fclose(f);
    return data;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.graft [IMAGE...]\n", argv[0]);
        return 2;
    }
    if (graft_abi_version() != GRAFT_ABI_VERSION) {
        fprintf(stderr, "error: libgraft_runtime %s implements C interface %u, graft.h is %d\n",
                graft_version(), graft_abi_version(), GRAFT_ABI_VERSION);
        return 1;
    }
    size_t len = 0;
    uint8_t *bytes = read_file(argv[1], &len);
    if (bytes == NULL) {
        perror(argv[1]);
        return 1;
    }
    GraftModel *model = graft_model_load_buffer(bytes, len);
    free(bytes); /* the model keeps its own copy */
    if (model == NULL) {
        fprintf(stderr, "error: %s\n", graft_last_error());
        return 1;
    }
    int status = 0;
    size_t classes = graft_model_num_labels(model);
    size_t k = classes < 3 ? classes : 3;
    GraftLabelScore top[3];
    for (int i = 2; i < argc; i++) {
        int n = graft_classify_file(model, argv[i], top, k);
        if (n < 0) {
            fprintf(stderr, "error: %s\n", graft_last_error());
            status = 1;
            continue;
        }
        printf("%s:", argv[i]);
        for (int j = 0; j < n; j++) {
            printf("%s %s %.3f", j ? "," : "", graft_model_label(model, top[j].index), top[j].probability);
        }
        printf("\n");
    }

    /* A raw BGRA buffer: 64x48 gradient, rows padded to 300 bytes. */
    const uint32_t width = 64, height = 48;
    const size_t stride = 300;
    uint8_t *bgra = calloc(stride * height, 1);
    float *logits = calloc(classes, sizeof(float));
    for (uint32_t y = 0; y < height; y++) {
        for (uint32_t x = 0; x < width; x++) {
            uint8_t *px = bgra + y * stride + 4 * x;
            px[2] = (uint8_t)(4 * x);       /* red */
            px[1] = (uint8_t)(5 * y);       /* green */
            px[0] = (uint8_t)(2 * (x + y)); /* blue */
            px[3] = 255;
        }
    }
    int n = graft_classify_pixels(model, bgra, width, height, stride, GRAFT_PIXEL_FORMAT_BGRA8, top, 1);
    int m = graft_logits_pixels(model, bgra, width, height, stride, GRAFT_PIXEL_FORMAT_BGRA8, logits, classes);
    uint32_t input_width = 0, input_height = 0;
    if (n == 1 && m == (int)classes && graft_model_input_size(model, &input_width, &input_height) == 0) {
        printf("gradient: %s %.3f\n", graft_model_label(model, top[0].index), top[0].probability);
        printf("logits:");
        for (int j = 0; j < m; j++) {
            printf(" %.4f", logits[j]);
        }
        printf("\ninput: %ux%u\n", input_width, input_height);
    } else {
        fprintf(stderr, "error: %s\n", graft_last_error());
        status = 1;
    }
    free(logits);
    free(bgra);
    graft_model_free(model);
    return status;
}
