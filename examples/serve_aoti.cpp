// Run an AOTInductor package written by `python -m mtl_dist.export CKPT model.pt2 --format pt2
// --aoti` from C++, with libtorch alone (the torch wheel's include/ and lib/ are enough):
//
//   T=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -std=c++17 -O1 examples/serve_aoti.cpp -I$T/include -I$T/include/torch/csrc/api/include \
//       -L$T/lib -ltorch -ltorch_cpu -lc10 -lz -Wl,-rpath,$T/lib -o serve_aoti
//   ./serve_aoti model.pt2 BATCH NUM_DENSE NUM_SPARSE [NUM_FLOAT [FLOAT_VALUE]]
//
// Inputs, in the package's order (extra/mtl_dist.json "inputs"): dense [B, Dd] float32, then per
// id input (sparse features, then each sequence's id lists: NUM_SPARSE in all) its ids [N_f]
// int64, then per sequence float side column (NUM_FLOAT, default 0) its values [N_f] float32,
// then every input's offsets [B + 1] int64 in the same order. This probe feeds dense 0.5
// everywhere, id 0 as every row's single id and FLOAT_VALUE (default 0; "nan" reads as NaN) as
// every float list's single value, and prints the output [B, T]: a client builds the real inputs
// as examples/serve.py does. The program checks its float inputs (finite, aligned with their
// ids): one it refuses stops with its message naming the input, exit code 4.
//
// Before loading, every member of the package (a zip archive) is checked against the CRC-32
// its zip entry records (zlib's crc32): a damaged, empty or truncated package stops naming the
// file and the member, exit code 3. (libtorch's loader does not check them.)
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <zlib.h>

#include <cstdint>
#include <fstream>
#include <iostream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

uint32_t le(const std::string& b, size_t at, int n) {  // a little-endian field of n bytes
  if (at + n > b.size()) throw std::runtime_error("truncated (a zip record runs past the end)");
  uint32_t v = 0;
  for (int i = n - 1; i >= 0; --i) v = (v << 8) | static_cast<unsigned char>(b[at + i]);
  return v;
}

// Every member's stored bytes against its central-directory CRC-32; throws naming the problem.
void verify_package(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("no such file");
  const std::string b((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  if (b.empty()) throw std::runtime_error("the file is empty (0 bytes)");
  const size_t eocd = b.rfind(std::string("PK\x05\x06", 4));
  if (eocd == std::string::npos || b.size() - eocd < 22)
    throw std::runtime_error("truncated or not a zip archive (no zip directory at its end)");
  const uint32_t entries = le(b, eocd + 10, 2), dir = le(b, eocd + 16, 4);
  if (entries == 0xFFFF || dir == 0xFFFFFFFFu)
    throw std::runtime_error("a zip64 archive: not verified by this client");
  size_t at = dir;
  for (uint32_t e = 0; e < entries; ++e) {
    if (le(b, at, 4) != 0x02014b50u) throw std::runtime_error("damaged zip directory");
    const uint32_t method = le(b, at + 10, 2), crc = le(b, at + 16, 4);
    const uint32_t size = le(b, at + 20, 4), name_len = le(b, at + 28, 2);
    const uint32_t skip = name_len + le(b, at + 30, 2) + le(b, at + 32, 2);
    const uint32_t local = le(b, at + 42, 4);
    const std::string name = b.substr(at + 46, name_len);
    if (method != 0) throw std::runtime_error("member " + name + " is compressed: not verified");
    if (le(b, local, 4) != 0x04034b50u) throw std::runtime_error("member " + name + ": damaged header");
    const size_t data = local + 30 + le(b, local + 26, 2) + le(b, local + 28, 2);
    if (data + size > b.size()) throw std::runtime_error("member " + name + " is truncated");
    const uLong got = crc32(0L, reinterpret_cast<const Bytef*>(b.data() + data), size);
    if (got != crc)
      throw std::runtime_error("member " + name + " does not match its CRC-32 (damaged after it "
                               "was written)");
    at += 46 + skip;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 5 || argc > 7) {
    std::cerr << "usage: serve_aoti model.pt2 BATCH NUM_DENSE NUM_SPARSE [NUM_FLOAT [FLOAT_VALUE]]\n";
    return 2;
  }
  try {
    verify_package(argv[1]);
  } catch (const std::exception& e) {
    std::cerr << "serve_aoti: error: " << argv[1] << ": " << e.what()
              << ": not a complete mtl-dist serving package; python -m mtl_dist.export CHECKPOINT "
                 "model.pt2 --format pt2 --aoti writes one\n";
    return 3;
  }
  const int64_t batch = std::stoll(argv[2]), dense = std::stoll(argv[3]);
  const int sparse = std::stoi(argv[4]), floats = argc > 5 ? std::stoi(argv[5]) : 0;
  const double value = argc > 6 ? std::stod(argv[6]) : 0.0;  // std::stod reads "nan" as NaN
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  std::vector<at::Tensor> inputs{at::full({batch, dense}, 0.5, at::kFloat)};
  for (int f = 0; f < sparse; ++f) inputs.push_back(at::zeros({batch}, at::kLong));
  for (int f = 0; f < floats; ++f) inputs.push_back(at::full({batch}, value, at::kFloat));
  for (int f = 0; f < sparse + floats; ++f) inputs.push_back(at::arange(batch + 1, at::kLong));
  std::vector<at::Tensor> out;
  try {
    out = loader.run(inputs);
  } catch (const std::exception& e) {  // the program's own checks (its float inputs)
    std::cerr << "serve_aoti: error: the program refused its inputs: " << e.what() << "\n";
    return 4;
  }
  std::cout.precision(9);
  for (int64_t b = 0; b < out[0].size(0); ++b) {
    for (int64_t t = 0; t < out[0].size(1); ++t) std::cout << out[0][b][t].item<float>() << " ";
    std::cout << "\n";
  }
  return 0;
}
