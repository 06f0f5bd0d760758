/* Region-of-interest JPEG decoding with libjpeg(-turbo): decode only the rows and MCU columns of a
 * crop, at a DCT scale of 1/1, 1/2, 1/4 or 1/8.
 *
 * libjpeg-turbo's jpeg_crop_scanline() (columns, widened to iMCU boundaries) and
 * jpeg_skip_scanlines() (rows) skip the inverse DCT, upsampling and colour conversion of what lies
 * outside the crop; entropy decoding still reads the whole scan. The scale is chosen by the caller
 * (coatnet_scale/data/roi_jpeg.py), as Pillow's draft mode chooses it.
 *
 * decode(data, scale_denom, x0, y0, x1, y1) -> (rgb_bytes, x_offset, width) or None
 *   data        the JPEG bytes
 *   x0..y1      the wanted region in scaled output pixels (x1, y1 exclusive, clamped here)
 *   returns     RGB rows y0..y1 of the columns x_offset..x_offset+width (x_offset <= x0 and
 *               x_offset + width >= x1: the crop is widened to an iMCU boundary), or None for
 *               colour spaces libjpeg cannot convert to RGB (CMYK, YCCK: the caller falls back).
 * Errors of libjpeg, and a premature end of data within the rows read, raise ValueError with
 * libjpeg's message (a file truncated below the region is caught by the caller's end-of-image
 * check, roi_jpeg.py, so that whether a file is bad does not depend on the crop).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>
#include <jerror.h>

struct error_manager {
    struct jpeg_error_mgr pub;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr cinfo) {
    struct error_manager *err = (struct error_manager *)cinfo->err;
    (*cinfo->err->format_message)(cinfo, err->message);
    longjmp(err->jump, 1);
}

static void on_message(j_common_ptr cinfo, int level) {
    /* Warnings (level -1) are silent, except a premature end of data: that is a truncated file. */
    if (level < 0 && cinfo->err->msg_code == JWRN_JPEG_EOF) {
        on_error(cinfo);
    }
}

static PyObject *decode(PyObject *self, PyObject *args) {
    Py_buffer data;
    int scale_denom, x0, y0, x1, y1;
    if (!PyArg_ParseTuple(args, "y*iiiii", &data, &scale_denom, &x0, &y0, &x1, &y1)) {
        return NULL;
    }
    struct jpeg_decompress_struct cinfo;
    struct error_manager err;
    unsigned char *volatile pixels = NULL;
    PyObject *volatile result = NULL;

    memset(&cinfo, 0, sizeof(cinfo)); /* jpeg_destroy_decompress is safe on it from here on */
    cinfo.err = jpeg_std_error(&err.pub);
    err.pub.error_exit = on_error;
    err.pub.emit_message = on_message;
    if (setjmp(err.jump)) { /* before create: an error inside it lands here too (libjpeg's example.c) */
        PyErr_SetString(PyExc_ValueError, err.message);
        goto done;
    }
    jpeg_create_decompress(&cinfo);
    jpeg_mem_src(&cinfo, (const unsigned char *)data.buf, (unsigned long)data.len);
    jpeg_read_header(&cinfo, TRUE);
    if (cinfo.jpeg_color_space == JCS_CMYK || cinfo.jpeg_color_space == JCS_YCCK) {
        Py_INCREF(Py_None);
        result = Py_None;
        goto done;
    }
    cinfo.out_color_space = JCS_RGB;
    cinfo.scale_num = 1;
    cinfo.scale_denom = (unsigned int)scale_denom;
    jpeg_start_decompress(&cinfo);

    int full_height = (int)cinfo.output_height;
    if (x0 < 0) x0 = 0;
    if (y0 < 0) y0 = 0;
    if (x1 > (int)cinfo.output_width) x1 = (int)cinfo.output_width;
    if (y1 > full_height) y1 = full_height;
    if (x1 <= x0 || y1 <= y0) {
        PyErr_SetString(PyExc_RuntimeError, "empty region"); /* the caller's arithmetic: a bug */
        goto done;
    }
    JDIMENSION x_offset = (JDIMENSION)x0, width = (JDIMENSION)(x1 - x0);
    if (width < cinfo.output_width) {
        jpeg_crop_scanline(&cinfo, &x_offset, &width); /* widens to iMCU boundaries */
    }
    size_t stride = (size_t)cinfo.output_width * (size_t)cinfo.output_components;
    int rows = y1 - y0;
    pixels = (unsigned char *)malloc(stride * (size_t)rows);
    if (pixels == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    if (y0 > 0) {
        jpeg_skip_scanlines(&cinfo, (JDIMENSION)y0);
    }
    while ((int)cinfo.output_scanline < y1) {
        JSAMPROW row = pixels + stride * (size_t)((int)cinfo.output_scanline - y0);
        jpeg_read_scanlines(&cinfo, &row, 1);
    }
    result = Py_BuildValue(
        "(y#II)", (const char *)pixels, (Py_ssize_t)(stride * (size_t)rows), x_offset,
        cinfo.output_width);

done:
    free(pixels);
    jpeg_destroy_decompress(&cinfo); /* also aborts a decompression left unfinished */
    PyBuffer_Release(&data);
    return (PyObject *)result;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, "Decode a region of a JPEG at a DCT scale (see the module)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_roi_jpeg", "Region-of-interest JPEG decoding (libjpeg-turbo).", -1,
    methods,
};

PyMODINIT_FUNC PyInit__roi_jpeg(void) { return PyModule_Create(&module); }
