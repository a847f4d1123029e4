// fastcascade._C._launch_config(kernel, args): the launch configuration a CUDA kernel of fastcascade
// would get for a shape, computed by the same host headers the .cu files launch with. Compiled in
// every build (CPU-only too), so tests check every shape against the hardware limits without a GPU.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <map>
#include <string>

#include "common/launch.h"
#include "dice_focal/dice_focal_launch.h"
#include "focal/focal_launch.h"
#include "metrics/metrics_launch.h"
#include "pixel_adapter/pixel_adapter_launch.h"
#include "pooled_adapter/pooled_adapter_launch.h"
#include "routing/routing_launch.h"

// Its own namespace: setup.py may compile several CPU sources as one translation unit.
namespace fastcascade::launch_cpu {
namespace {

namespace py = pybind11;
using Args = std::map<std::string, int64_t>;

int64_t arg(const Args& a, const char* name) {
  const auto it = a.find(name);
  if (it == a.end()) throw py::key_error(std::string("_launch_config: args needs '") + name + "'");
  return it->second;
}

py::dict as_dict(const LaunchConfig& c) {
  py::dict d;
  d["block"] = py::make_tuple(c.block_x, c.block_y, c.block_z);
  d["grid"] = py::make_tuple(c.grid_x, c.grid_y, c.grid_z);
  d["threads"] = c.threads();
  d["static_smem"] = c.static_smem;
  d["dynamic_smem"] = c.dynamic_smem;
  d["smem_limit"] = c.smem_limit;
  d["opt_in"] = c.opt_in;
  d["error"] = c.error;
  return d;
}

using Config = py::dict (*)(const Args&, const DeviceLimits&);

const std::map<std::string, Config>& configs() {
  static const std::map<std::string, Config> table = {
      {"dice_focal_forward",
       [](const Args& a, const DeviceLimits& dev) {
         const DiceForwardLaunch L =
             dice_focal_forward_launch(arg(a, "B"), arg(a, "C"), arg(a, "S"), arg(a, "acc_bytes"), dev);
         py::dict d = as_dict(L.cfg);
         d["nchunk"] = L.nchunk;
         d["acc_ld"] = L.acc_ld;
         return d;
       }},
      {"dice_focal_chunks",
       [](const Args& a, const DeviceLimits&) { return as_dict(dice_focal_chunks_launch(arg(a, "B"))); }},
      {"dice_focal_backward",
       [](const Args& a, const DeviceLimits& dev) {
         return as_dict(dice_focal_backward_launch(arg(a, "B"), arg(a, "S"), dev));
       }},
      {"pixel_adapter_forward",
       [](const Args& a, const DeviceLimits& dev) {
         const PixelLaunch L = pixel_adapter_launch(arg(a, "T"), arg(a, "r"), arg(a, "acc_bytes"), false, dev);
         py::dict d = as_dict(L.cfg);
         d["tile"] = L.tile;
         return d;
       }},
      {"pixel_adapter_backward",
       [](const Args& a, const DeviceLimits& dev) {
         const PixelLaunch L = pixel_adapter_launch(arg(a, "T"), arg(a, "r"), arg(a, "acc_bytes"), true, dev);
         py::dict d = as_dict(L.cfg);
         d["tile"] = L.tile;
         return d;
       }},
      {"pooled_adapter_forward",
       [](const Args& a, const DeviceLimits& dev) {
         return as_dict(pooled_adapter_launch(arg(a, "B"), arg(a, "C"), arg(a, "r"), arg(a, "acc_bytes"), false, dev));
       }},
      {"pooled_adapter_backward",
       [](const Args& a, const DeviceLimits& dev) {
         return as_dict(pooled_adapter_launch(arg(a, "B"), arg(a, "C"), arg(a, "r"), arg(a, "acc_bytes"), true, dev));
       }},
      {"route_rows",
       [](const Args& a, const DeviceLimits& dev) { return as_dict(route_rows_launch(arg(a, "N"), dev)); }},
      {"partition",
       [](const Args& a, const DeviceLimits& dev) {
         const PartitionLaunch L = partition_launch(arg(a, "N"), arg(a, "B"), dev);
         py::dict d = as_dict(L.cfg);
         d["ntiles"] = L.ntiles;
         d["by_sort"] = L.by_sort;
         return d;
       }},
      {"copy_rows",
       [](const Args& a, const DeviceLimits& dev) {
         const CopyRowsLaunch L =
             copy_rows_launch(arg(a, "M"), arg(a, "row_bytes"), arg(a, "src_offset"), arg(a, "dst_offset"), dev);
         py::dict d = as_dict(L.cfg);
         d["vec"] = L.vec;
         d["row_vecs"] = L.row_vecs;
         return d;
       }},
      {"confusion_matrix",
       [](const Args& a, const DeviceLimits& dev) {
         const ConfusionLaunch L = confusion_launch(arg(a, "N"), arg(a, "C"), dev);
         py::dict d = as_dict(L.cfg);
         d["replicas"] = L.replicas;
         return d;
       }},
      {"sigmoid_focal",
       [](const Args& a, const DeviceLimits& dev) {
         return as_dict(sigmoid_focal_launch(arg(a, "N"), arg(a, "acc_bytes"), dev));
       }},
      {"softmax_focal",
       [](const Args& a, const DeviceLimits& dev) {
         return as_dict(softmax_focal_launch(arg(a, "R"), arg(a, "acc_bytes"), dev));
       }},
      {"focal_finalize", [](const Args&, const DeviceLimits&) { return as_dict(focal_finalize_launch()); }},
  };
  return table;
}

}  // namespace
}  // namespace fastcascade::launch_cpu

namespace fastcascade {

void define_launch_config(pybind11::module_& m) {
  using namespace launch_cpu;
  m.def(
      "_launch_config",
      [](const std::string& kernel, const Args& args) {
        const auto it = configs().find(kernel);
        if (it == configs().end()) {
          std::string known;
          for (const auto& kv : configs()) known += (known.empty() ? "" : ", ") + kv.first;
          throw py::value_error("_launch_config: kernel must be one of " + known + ", got '" + kernel + "'");
        }
        return it->second(args, DeviceLimits{arg(args, "sms"), arg(args, "smem_optin")});
      },
      py::arg("kernel"), py::arg("args"),
      "The launch configuration of a fastcascade CUDA kernel for a shape: args holds the shape's sizes "
      "and the device's sms and smem_optin (cudaDeviceProp multiProcessorCount, sharedMemPerBlockOptin).");
  m.def("_launch_kernels", [] {
    std::vector<std::string> names;
    for (const auto& kv : configs()) names.push_back(kv.first);
    return names;
  });
}

}  // namespace fastcascade
