// Calls the installed C++ API; exits non-zero unless the loss matches a direct computation.
#include <cmath>
#include <cstdio>
#include <vector>

#include "fastxent/fastxent.hpp"

int main() {
  const std::vector<float> z = {2.0f, 1.0f, 0.1f, 0.5f, 2.5f, 0.3f};
  const std::vector<int64_t> y = {0, 1};
  std::vector<float> g(z.size());
  fastxent::Options opt;  // mean, like PyTorch's F.cross_entropy
  const double loss =
      fastxent::cross_entropy<float>(z.data(), 2, 3, 3, y.data(), nullptr, opt, g.data(), nullptr);
  double ref = 0.0;
  for (int n = 0; n < 2; ++n) {
    double s = 0.0;
    for (int c = 0; c < 3; ++c) s += std::exp(double(z[n * 3 + c]));
    ref += std::log(s) - z[n * 3 + y[n]];
  }
  ref /= 2;
  std::printf("isa %s loss %.7f reference %.7f\n", fastxent::active_isa().c_str(), loss, ref);
  return std::fabs(loss - ref) < 1e-6 ? 0 : 1;
}
