// pybind11 face of the aligner (module xtoken_ext._C). Inputs are validated and copied/viewed with the GIL held;
// the alignment work runs with the GIL released; outputs are numpy arrays that own their C++ buffers.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <utility>
#include <vector>

#include "align.hpp"
#include "losses.hpp"
#include "parallel.hpp"

namespace py = pybind11;
using I64 = py::array_t<int64_t, py::array::c_style | py::array::forcecast>;

namespace {

// Zero-copy: the numpy array's base is a capsule that deletes the vector.
template <class T>
py::array owned(std::vector<T>&& v, std::vector<py::ssize_t> shape, const py::dtype& dtype) {
  auto* heap = new std::vector<T>(std::move(v));
  py::capsule base(heap, [](void* p) { delete static_cast<std::vector<T>*>(p); });
  return py::array(dtype, std::move(shape), heap->data(), base);
}

py::tuple to_numpy(xt::Result&& r) {
  const auto k = static_cast<py::ssize_t>(r.size());
  return py::make_tuple(owned(std::move(r.chunks), {k, 4}, py::dtype::of<int64_t>()),
                        owned(std::move(r.correct), {k}, py::dtype::of<bool>()));
}

// Concatenate per-item results into one allocation per output (copies run on the same threads):
// (chunks [sum K, 4], correct [sum K], offsets [B+1]).
py::tuple batch_to_numpy(std::vector<xt::Result>&& rs, int64_t threads) {
  std::vector<int64_t> offsets{0};
  for (const auto& r : rs) offsets.push_back(offsets.back() + r.size());
  std::vector<int64_t> chunks;
  std::vector<uint8_t> correct;
  {
    py::gil_scoped_release nogil;
    chunks.resize(static_cast<size_t>(4 * offsets.back()));
    correct.resize(static_cast<size_t>(offsets.back()));
    xt::parallel_for(static_cast<int64_t>(rs.size()), threads, [&](int64_t b) {
      std::copy(rs[b].chunks.begin(), rs[b].chunks.end(), chunks.begin() + 4 * offsets[b]);
      std::copy(rs[b].correct.begin(), rs[b].correct.end(), correct.begin() + offsets[b]);
      rs[b] = xt::Result();
    });
  }
  const auto k = static_cast<py::ssize_t>(offsets.back()), b = static_cast<py::ssize_t>(offsets.size());
  return py::make_tuple(owned(std::move(chunks), {k, 4}, py::dtype::of<int64_t>()),
                        owned(std::move(correct), {k}, py::dtype::of<bool>()),
                        owned(std::move(offsets), {b}, py::dtype::of<int64_t>()));
}

xt::Seq seq_from_bytes(const py::sequence& toks, const char* side) {
  xt::Seq s;
  for (const auto& item : toks) {
    if (!PyBytes_Check(item.ptr()))
      throw py::type_error(std::string(side) + " tokens must be bytes, got " +
                           std::string(py::str(py::type::of(item).attr("__name__"))));
    s.add(PyBytes_AS_STRING(item.ptr()), PyBytes_GET_SIZE(item.ptr()));
  }
  return s;
}

xt::Params make_params(int64_t band, int64_t full_cells, int64_t lookahead, int64_t gram) {
  if (band < 0 || full_cells < 0 || lookahead < 1 || gram < 1)
    throw py::value_error("need band >= 0, full_cells >= 0, lookahead >= 1, gram >= 1");
  return xt::Params{band, full_cells, lookahead, gram};
}

void check_same_length(const I64& a, const I64& b, const char* what) {
  if (a.ndim() != 1 || b.ndim() != 1) throw py::value_error(std::string(what) + " must be 1-D");
  if (a.shape(0) != b.shape(0))
    throw py::value_error(std::string(what) + ": starts and ends differ in length (" + std::to_string(a.shape(0)) +
                          " vs " + std::to_string(b.shape(0)) + ")");
}

void check_batch_len(size_t a, size_t b, const char* what) {
  if (a != b)
    throw py::value_error(std::string(what) + ": batch sizes differ (" + std::to_string(a) + " vs " +
                          std::to_string(b) + ")");
}

#define XT_PARAMS_ARGS py::arg("band") = 64, py::arg("full_cells") = 1 << 16, py::arg("lookahead") = 64, \
                       py::arg("gram") = 16

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "xtoken_ext native span aligner (torch-free C++17)";

  py::class_<xt::Vocab>(m, "Vocab", "Canonical bytes of every token id of one tokenizer.")
      .def(py::init([](const py::sequence& token_bytes) {
             xt::Vocab v;
             v.table = seq_from_bytes(token_bytes, "vocabulary");
             return v;
           }),
           py::arg("token_bytes"))
      .def_property_readonly("size", &xt::Vocab::size)
      .def("__len__", &xt::Vocab::size);

  m.def(
      "merge_offsets_batch",
      [](const std::vector<I64>& ss, const std::vector<I64>& se, const std::vector<I64>& ts,
         const std::vector<I64>& te, int64_t threads) {
        check_batch_len(ss.size(), se.size(), "student offsets");
        check_batch_len(ss.size(), ts.size(), "student/teacher offsets");
        check_batch_len(ts.size(), te.size(), "teacher offsets");
        for (size_t b = 0; b < ss.size(); ++b) {
          check_same_length(ss[b], se[b], "student offsets");
          check_same_length(ts[b], te[b], "teacher offsets");
          xt::check_offsets(ss[b].data(), se[b].data(), ss[b].shape(0), "student");
          xt::check_offsets(ts[b].data(), te[b].data(), ts[b].shape(0), "teacher");
        }
        std::vector<xt::Result> rs(ss.size());
        {
          py::gil_scoped_release nogil;
          xt::parallel_for(static_cast<int64_t>(rs.size()), threads, [&](int64_t b) {
            rs[b] = xt::merge_offsets(ss[b].data(), se[b].data(), ss[b].shape(0), ts[b].data(), te[b].data(),
                                      ts[b].shape(0));
          });
        }
        return batch_to_numpy(std::move(rs), threads);
      },
      py::arg("student_starts"), py::arg("student_ends"), py::arg("teacher_starts"), py::arg("teacher_ends"),
      py::arg("threads") = 0,
      "Offset merge of B sequence pairs (byte offsets). Returns (chunks [K,4], correct [K], offsets [B+1]).");

  m.def(
      "align_ids_batch",
      [](const xt::Vocab& vs, const xt::Vocab& vt, const std::vector<I64>& s_ids, const std::vector<I64>& t_ids,
         const std::string& method, int s_prefix, int t_prefix, int64_t threads, int64_t band,
         int64_t full_cells, int64_t lookahead, int64_t gram) {
        const xt::Method meth = xt::parse_method(method);
        const xt::Params p = make_params(band, full_cells, lookahead, gram);
        check_batch_len(s_ids.size(), t_ids.size(), "student/teacher ids");
        for (int prefix : {s_prefix, t_prefix})
          if (prefix < xt::kPrefixNone || prefix > xt::kPrefixUnlessSpace)
            throw py::value_error("prefix modes are 0 (none), 1 (always) or 2 (unless the text starts with a space)");
        for (size_t b = 0; b < s_ids.size(); ++b) {
          if (s_ids[b].ndim() != 1 || t_ids[b].ndim() != 1) throw py::value_error("ids must be 1-D");
          xt::check_ids(s_ids[b].data(), s_ids[b].shape(0), vs.size(), "student");
          xt::check_ids(t_ids[b].data(), t_ids[b].shape(0), vt.size(), "teacher");
        }
        std::vector<xt::Result> rs(s_ids.size());
        {
          py::gil_scoped_release nogil;
          xt::parallel_for(static_cast<int64_t>(rs.size()), threads, [&](int64_t b) {
            xt::Seq S = vs.sequence(s_ids[b].data(), s_ids[b].shape(0));
            xt::Seq T = vt.sequence(t_ids[b].data(), t_ids[b].shape(0));
            xt::canonical_pair(S, s_prefix, T, t_prefix);
            rs[b] = xt::align_streams(S, T, meth, p);
          });
        }
        return batch_to_numpy(std::move(rs), threads);
      },
      py::arg("student_vocab"), py::arg("teacher_vocab"), py::arg("student_ids"), py::arg("teacher_ids"),
      py::arg("method") = "auto", py::arg("student_prefix") = 0, py::arg("teacher_prefix") = 0,
      py::arg("threads") = 0, XT_PARAMS_ARGS,
      "Align B pairs of id sequences over canonical bytes (prefix modes: see align.hpp Prefix). Returns (chunks [K,4], correct [K], offsets [B+1]).");

  m.def(
      "align_tokens",
      [](const py::sequence& s_tokens, const py::sequence& t_tokens, const std::string& method, int64_t band,
         int64_t full_cells, int64_t lookahead, int64_t gram) {
        const xt::Method meth = xt::parse_method(method);
        const xt::Params p = make_params(band, full_cells, lookahead, gram);
        const xt::Seq S = seq_from_bytes(s_tokens, "student");
        const xt::Seq T = seq_from_bytes(t_tokens, "teacher");
        xt::Result r;
        {
          py::gil_scoped_release nogil;
          r = xt::align_streams(S, T, meth, p);
        }
        return to_numpy(std::move(r));
      },
      py::arg("student_tokens"), py::arg("teacher_tokens"), py::arg("method") = "auto", XT_PARAMS_ARGS,
      "Align two token sequences given as lists of canonical bytes. Returns (chunks [K,4], correct [K]).");

  m.def(
      "dp_path",
      [](const py::sequence& s_tokens, const py::sequence& t_tokens) {
        const xt::Seq S = seq_from_bytes(s_tokens, "student");
        const xt::Seq T = seq_from_bytes(t_tokens, "teacher");
        std::vector<xt::Pair> pairs;
        xt::Params full;
        full.full_cells = INT64_MAX;
        const int64_t score2 = xt::dp_segment(S, 0, S.n(), T, 0, T.n(), full, pairs);
        xt::Result r;
        for (const auto& q : pairs) r.push(q.s0, q.s1, q.t0, q.t1, q.ok);
        auto t = to_numpy(std::move(r));
        return py::make_tuple(t[0], t[1], static_cast<double>(score2) / 2.0);
      },
      py::arg("student_tokens"), py::arg("teacher_tokens"),
      "Raw DP of METHOD.md 4.1-4.2 (full table, no anchors, no post-processing): (pairs [P,4], ok [P], score).");

  xt::bind_losses(m);
}
