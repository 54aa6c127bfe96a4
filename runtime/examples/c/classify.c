/* Classify images with a graft artifact from C.
 *
 *   cc -O2 -I runtime/include runtime/examples/c/classify.c -L target/release -lgraft_runtime \
 *      -Wl,-rpath,target/release -o classify
 *   ./classify model.graft bee.jpg ant.png
 *
 * Prints one line per image file ("path: label p, label p", like graft-run), then the top class of
 * a synthetic 64x48 RGB gradient passed as a raw buffer with padded rows.
 * Exit status: 0 ok, 1 an image or the model failed, 2 usage.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "graft.h"

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s MODEL.graft [IMAGE...]\n", argv[0]);
        return 2;
    }
    GraftModel *model = graft_model_load(argv[1]);
    if (model == NULL) {
        fprintf(stderr, "error: %s\n", graft_last_error());
        return 1;
    }
    int status = 0;
    size_t k = graft_model_num_labels(model) < 3 ? graft_model_num_labels(model) : 3;
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

    /* A raw RGB buffer: 64x48 gradient, rows padded to 200 bytes. */
    const uint32_t width = 64, height = 48;
    const size_t stride = 200;
    uint8_t *rgb = calloc(stride * height, 1);
    for (uint32_t y = 0; y < height; y++) {
        for (uint32_t x = 0; x < width; x++) {
            uint8_t *px = rgb + y * stride + 3 * x;
            px[0] = (uint8_t)(4 * x);
            px[1] = (uint8_t)(5 * y);
            px[2] = (uint8_t)(2 * (x + y));
        }
    }
    int n = graft_classify_rgb(model, rgb, width, height, stride, top, 1);
    if (n == 1) {
        printf("gradient: %s %.3f\n", graft_model_label(model, top[0].index), top[0].probability);
    } else {
        fprintf(stderr, "error: %s\n", graft_last_error());
        status = 1;
    }
    free(rgb);
    graft_model_free(model);
    return status;
}
