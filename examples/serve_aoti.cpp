// Run an AOTInductor package written by `python -m mtl_dist.export CKPT model.pt2 --format pt2
// --aoti` from C++, with libtorch alone (the torch wheel's include/ and lib/ are enough):
//
//   T=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -std=c++17 -O1 examples/serve_aoti.cpp -I$T/include -I$T/include/torch/csrc/api/include \
//       -L$T/lib -ltorch -ltorch_cpu -lc10 -Wl,-rpath,$T/lib -o serve_aoti
//   ./serve_aoti model.pt2 BATCH NUM_DENSE NUM_SPARSE
//
// Inputs, in the package's order (extra/mtl_dist.json "inputs"): dense [B, Dd] float32, then per
// sparse feature its ids [N_f] int64, then per feature its offsets [B + 1] int64. This probe
// feeds dense 0.5 everywhere and id 0 as every row's single id, and prints the output [B, T]:
// a client builds the real inputs as examples/serve.py does.
#include <ATen/ATen.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>

#include <iostream>
#include <string>
#include <vector>

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: serve_aoti model.pt2 BATCH NUM_DENSE NUM_SPARSE\n";
    return 2;
  }
  const int64_t batch = std::stoll(argv[2]), dense = std::stoll(argv[3]);
  const int sparse = std::stoi(argv[4]);
  torch::inductor::AOTIModelPackageLoader loader(argv[1]);
  std::vector<at::Tensor> inputs{at::full({batch, dense}, 0.5, at::kFloat)};
  for (int f = 0; f < sparse; ++f) inputs.push_back(at::zeros({batch}, at::kLong));
  for (int f = 0; f < sparse; ++f) inputs.push_back(at::arange(batch + 1, at::kLong));
  std::vector<at::Tensor> out = loader.run(inputs);
  std::cout.precision(9);
  for (int64_t b = 0; b < out[0].size(0); ++b) {
    for (int64_t t = 0; t < out[0].size(1); ++t) std::cout << out[0][b][t].item<float>() << " ";
    std::cout << "\n";
  }
  return 0;
}
