// pybind11 face of the aligner (module xtoken_ext._C). Inputs are validated and copied/viewed with the GIL held;
// the alignment work runs with the GIL released; outputs are numpy arrays that own their C++ buffers.
// Token ids index C++ tables, so they are copied before they are checked: another thread writing the caller's
// array after the check could otherwise make C++ read out of bounds. Offsets are only compared, never used as
// indices, so they stay zero-copy views.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstring>
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
template <class T, class A>
py::array owned(std::vector<T, A>&& v, std::vector<py::ssize_t> shape, const py::dtype& dtype) {
  auto* heap = new std::vector<T, A>(std::move(v));
  py::capsule base(heap, [](void* p) { delete static_cast<std::vector<T, A>*>(p); });
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
  if (rs.size() == 1) {  // nothing to concatenate
    const py::tuple t = to_numpy(std::move(rs[0]));
    return py::make_tuple(t[0], t[1], owned(std::move(offsets), {2}, py::dtype::of<int64_t>()));
  }
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

xt::Vocab make_vocab(const py::sequence& token_bytes, const py::object& special) {
  xt::Seq table = seq_from_bytes(token_bytes, "vocabulary");
  if (special.is_none()) return xt::Vocab(std::move(table));
  const auto cls = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(special);
  if (!cls || cls.ndim() != 1 || cls.shape(0) != table.n())
    throw py::value_error("special must be 1-D integers, one per token (" + std::to_string(table.n()) + ")");
  for (py::ssize_t k = 0; k < cls.shape(0); ++k) {
    const int64_t c = cls.data()[k];
    if (c < 0 || c > xt::kSpecialBits || (c != 0 && !(c & xt::kSpecial)))
      throw py::value_error("special[" + std::to_string(k) + "] = " + std::to_string(c) +
                            ": need 0 (text) or kSpecial (1) plus role bits (2 bos, 4 eos, 8 eot, 16 unk)");
    table.cls.push_back(static_cast<uint8_t>(c));
  }
  return xt::Vocab(std::move(table));
}

// A plain list of plain ints that fit in int64 (tokenizer output) -> ids, read directly (numpy's conversion of a
// list costs ~10x more). False for anything else, which then takes the numpy route and its errors.
bool ids_from_list(const py::handle& obj, std::vector<int64_t>& ids) {
  if (!PyList_CheckExact(obj.ptr())) return false;
  const Py_ssize_t n = PyList_GET_SIZE(obj.ptr());
  ids.resize(static_cast<size_t>(n));
  for (Py_ssize_t k = 0; k < n; ++k) {
    PyObject* x = PyList_GET_ITEM(obj.ptr(), k);
    int overflow = 0;
    if (!PyLong_CheckExact(x)) return false;
    ids[static_cast<size_t>(k)] = PyLong_AsLongLongAndOverflow(x, &overflow);
    if (overflow) return false;
  }
  return true;
}

// An owned int64 copy of id sequence `seq` of a batch (seq < 0: a single sequence), checked against the vocabulary.
// Unsigned ids >= 2**63 are reported with their value (a cast to int64 would show them as negative); non-integer
// dtypes are a TypeError.
std::vector<int64_t> owned_ids(const py::handle& obj, int64_t vocab, const char* side, int64_t seq) {
  const std::string where = std::string(side) + (seq < 0 ? " ids" : " ids[" + std::to_string(seq) + "]");
  std::vector<int64_t> ids;
  auto out_of_range = [&](const std::string& value, size_t k) {
    return std::out_of_range(where + ": id " + value + " at position " + std::to_string(k) +
                             " is out of range for a vocabulary of " + std::to_string(vocab));
  };
  auto check = [&]() {
    for (size_t k = 0; k < ids.size(); ++k)
      if (ids[k] < 0 || ids[k] >= vocab) throw out_of_range(std::to_string(ids[k]), k);
  };
  if (ids_from_list(obj, ids)) {
    check();
    return ids;
  }
  py::array a = py::array::ensure(obj);
  if (!a) throw py::type_error(where + " must be an array or sequence of integers");
  if (a.ndim() != 1) throw py::value_error(where + " must be 1-D");
  const char kind = a.dtype().kind();
  if (a.size() > 0 && kind != 'i' && kind != 'u')
    throw py::type_error(where + " must be integers, got dtype " + std::string(py::str(a.dtype())));
  ids.resize(static_cast<size_t>(a.size()));
  if (kind == 'u') {
    const auto u = py::array_t<uint64_t, py::array::c_style | py::array::forcecast>::ensure(a);
    for (size_t k = 0; k < ids.size(); ++k) {
      const uint64_t x = u.data()[k];
      if (x >= static_cast<uint64_t>(vocab)) throw out_of_range(std::to_string(x), k);
      ids[k] = static_cast<int64_t>(x);
    }
    return ids;
  }
  const auto v = py::array_t<int64_t, py::array::c_style | py::array::forcecast>::ensure(a);
  if (!ids.empty()) std::memcpy(ids.data(), v.data(), ids.size() * sizeof(int64_t));
  check();
  return ids;
}

std::vector<std::vector<int64_t>> owned_id_batch(const py::sequence& batch, int64_t vocab, const char* side) {
  std::vector<std::vector<int64_t>> out;
  for (const auto& item : batch) out.push_back(owned_ids(item, vocab, side, static_cast<int64_t>(out.size())));
  return out;
}

void check_batch_len(size_t a, size_t b, const char* what) {
  if (a != b)
    throw py::value_error(std::string(what) + ": batch sizes differ (" + std::to_string(a) + " vs " +
                          std::to_string(b) + ")");
}

xt::Params make_params(int64_t band, int64_t full_cells, int64_t lookahead, int64_t gram) {
  if (band < 0 || full_cells < 0 || lookahead < 1 || gram < 1 || band > xt::kMaxParam ||
      lookahead > xt::kMaxParam || gram > xt::kMaxParam)
    throw py::value_error("need 0 <= band, 1 <= lookahead, 1 <= gram (each <= " + std::to_string(xt::kMaxParam) +
                          ") and full_cells >= 0");
  return xt::Params{band, full_cells, lookahead, gram};
}

void check_prefixes(int sp, int tp) {
  for (int prefix : {sp, tp})
    if (prefix < xt::kPrefixNone || prefix > xt::kPrefixUnlessSpace)
      throw py::value_error("prefix modes are 0 (none), 1 (always) or 2 (unless the text starts with a space)");
}

// Everything of an id alignment but the ids, checked once: Aligner.align_ids pays no per-call argument parsing.
struct IdAligner {
  const xt::Vocab* vs;
  const xt::Vocab* vt;
  xt::Method method;
  int s_prefix, t_prefix;
  xt::Params p;

  IdAligner(const xt::Vocab& s, const xt::Vocab& t, const std::string& meth, int sp, int tp, int64_t band,
            int64_t full_cells, int64_t lookahead, int64_t gram)
      : vs(&s), vt(&t), method(xt::parse_method(meth)), s_prefix(sp), t_prefix(tp),
        p(make_params(band, full_cells, lookahead, gram)) {
    check_prefixes(sp, tp);
  }

  void pair(const std::vector<int64_t>& s, const std::vector<int64_t>& t, xt::Result& r) const {
    xt::align_ids(*vs, s.data(), static_cast<int64_t>(s.size()), *vt, t.data(), static_cast<int64_t>(t.size()),
                  method, s_prefix, t_prefix, p, r);
  }

  py::tuple align(const py::handle& s_obj, const py::handle& t_obj) const {
    const auto s = owned_ids(s_obj, vs->size(), "student", -1);
    const auto t = owned_ids(t_obj, vt->size(), "teacher", -1);
    xt::Result r;
    {
      py::gil_scoped_release nogil;
      pair(s, t, r);
    }
    return to_numpy(std::move(r));
  }

  py::tuple align_batch(const py::sequence& s_obj, const py::sequence& t_obj, int64_t threads) const {
    const auto s = owned_id_batch(s_obj, vs->size(), "student");
    const auto t = owned_id_batch(t_obj, vt->size(), "teacher");
    check_batch_len(s.size(), t.size(), "student/teacher ids");
    const auto B = static_cast<int64_t>(s.size());
    if (xt::resolve_threads(threads, B) == 1) {  // in order into one Result: no per-pair buffers, no concatenation
      std::vector<int64_t> offsets{0};
      xt::Result r;
      {
        py::gil_scoped_release nogil;
        for (int64_t b = 0; b < B; ++b) {
          pair(s[b], t[b], r);
          offsets.push_back(r.size());
        }
      }
      const py::tuple out = to_numpy(std::move(r));
      return py::make_tuple(out[0], out[1], owned(std::move(offsets), {B + 1}, py::dtype::of<int64_t>()));
    }
    std::vector<xt::Result> rs(s.size());
    {
      py::gil_scoped_release nogil;
      xt::parallel_for(B, threads, [&](int64_t b) { pair(s[b], t[b], rs[b]); });
    }
    return batch_to_numpy(std::move(rs), threads);
  }
};

void check_same_length(const I64& a, const I64& b, const char* what) {
  if (a.ndim() != 1 || b.ndim() != 1) throw py::value_error(std::string(what) + " must be 1-D");
  if (a.shape(0) != b.shape(0))
    throw py::value_error(std::string(what) + ": starts and ends differ in length (" + std::to_string(a.shape(0)) +
                          " vs " + std::to_string(b.shape(0)) + ")");
}

#define XT_PARAMS_ARGS py::arg("band") = 64, py::arg("full_cells") = 1 << 16, py::arg("lookahead") = 64, \
                       py::arg("gram") = 16

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "xtoken_ext native span aligner (torch-free C++17)";

  py::class_<xt::Vocab>(m, "Vocab", "Canonical bytes (and special-token bits) of every token id of one tokenizer.")
      .def(py::init(&make_vocab), py::arg("token_bytes"), py::arg("special") = py::none())
      .def_property_readonly("size", &xt::Vocab::size)
      .def("__len__", &xt::Vocab::size)
      .def(py::pickle(  // (token bytes, special bits or None): DataLoader workers rebuild the table from it
          [](const xt::Vocab& v) {
            py::list toks;
            for (int64_t k = 0; k < v.size(); ++k)
              toks.append(py::bytes(v.table.at(v.table.off[k]), static_cast<size_t>(v.table.len(k))));
            py::object cls = py::none();
            if (!v.table.cls.empty())
              cls = py::array_t<uint8_t>(static_cast<py::ssize_t>(v.table.cls.size()), v.table.cls.data());
            return py::make_tuple(toks, cls);
          },
          [](const py::tuple& t) {
            if (t.size() != 2) throw py::value_error("bad Vocab pickle state");
            return make_vocab(t[0].cast<py::sequence>(), t[1]);
          }));

  m.def(
      "merge_offsets_batch",
      [](const std::vector<I64>& ss, const std::vector<I64>& se, const std::vector<I64>& ts,
         const std::vector<I64>& te, int64_t threads, const xt::Vocab* vs, const xt::Vocab* vt,
         const py::object& s_ids_obj, const py::object& t_ids_obj, int s_prefix, int t_prefix) {
        check_batch_len(ss.size(), se.size(), "student offsets");
        check_batch_len(ss.size(), ts.size(), "student/teacher offsets");
        check_batch_len(ts.size(), te.size(), "teacher offsets");
        for (size_t b = 0; b < ss.size(); ++b) {
          check_same_length(ss[b], se[b], "student offsets");
          check_same_length(ts[b], te[b], "teacher offsets");
          xt::check_offsets(ss[b].data(), se[b].data(), ss[b].shape(0), "student");
          xt::check_offsets(ts[b].data(), te[b].data(), ts[b].shape(0), "teacher");
        }
        // Optional vocabularies + ids: the text path's correct flags (xt::mark_text_pair: equal canonical bytes,
        // the id path's prefix handling and special-token rule).
        check_prefixes(s_prefix, t_prefix);
        const bool vocabs = vs != nullptr || vt != nullptr;
        std::vector<std::vector<int64_t>> s_ids, t_ids;
        if (vocabs) {
          if (!vs || !vt || s_ids_obj.is_none() || t_ids_obj.is_none())
            throw py::value_error("student_vocab, teacher_vocab, student_ids and teacher_ids go together");
          s_ids = owned_id_batch(s_ids_obj.cast<py::sequence>(), vs->size(), "student");
          t_ids = owned_id_batch(t_ids_obj.cast<py::sequence>(), vt->size(), "teacher");
          check_batch_len(ss.size(), s_ids.size(), "student offsets/ids");
          check_batch_len(ts.size(), t_ids.size(), "teacher offsets/ids");
          for (size_t b = 0; b < ss.size(); ++b)
            if (static_cast<py::ssize_t>(s_ids[b].size()) != ss[b].shape(0) ||
                static_cast<py::ssize_t>(t_ids[b].size()) != ts[b].shape(0))
              throw py::value_error("sequence " + std::to_string(b) + ": ids and offsets differ in length");
        }
        std::vector<xt::Result> rs(ss.size());
        {
          py::gil_scoped_release nogil;
          xt::parallel_for(static_cast<int64_t>(rs.size()), threads, [&](int64_t b) {
            rs[b] = xt::merge_offsets(ss[b].data(), se[b].data(), ss[b].shape(0), ts[b].data(), te[b].data(),
                                      ts[b].shape(0));
            if (vocabs)
              xt::mark_text_pair(rs[b], *vs, s_ids[b].data(), ss[b].data(), se[b].data(), ss[b].shape(0), s_prefix,
                                 *vt, t_ids[b].data(), ts[b].data(), te[b].data(), ts[b].shape(0), t_prefix);
          });
        }
        return batch_to_numpy(std::move(rs), threads);
      },
      py::arg("student_starts"), py::arg("student_ends"), py::arg("teacher_starts"), py::arg("teacher_ends"),
      py::arg("threads") = 0, py::arg("student_vocab") = nullptr, py::arg("teacher_vocab") = nullptr,
      py::arg("student_ids") = py::none(), py::arg("teacher_ids") = py::none(), py::arg("student_prefix") = 0,
      py::arg("teacher_prefix") = 0,
      "Offset merge of B sequence pairs (byte offsets). Returns (chunks [K,4], correct [K], offsets [B+1]).");

  m.def(
      "align_ids_batch",
      [](const xt::Vocab& vs, const xt::Vocab& vt, const py::sequence& s_ids_obj, const py::sequence& t_ids_obj,
         const std::string& method, int s_prefix, int t_prefix, int64_t threads, int64_t band,
         int64_t full_cells, int64_t lookahead, int64_t gram) {
        return IdAligner(vs, vt, method, s_prefix, t_prefix, band, full_cells, lookahead, gram)
            .align_batch(s_ids_obj, t_ids_obj, threads);
      },
      py::arg("student_vocab"), py::arg("teacher_vocab"), py::arg("student_ids"), py::arg("teacher_ids"),
      py::arg("method") = "auto", py::arg("student_prefix") = 0, py::arg("teacher_prefix") = 0,
      py::arg("threads") = 0, XT_PARAMS_ARGS,
      "Align B pairs of id sequences over canonical bytes (prefix modes: see align.hpp Prefix). Returns (chunks [K,4], correct [K], offsets [B+1]).");

  py::class_<IdAligner>(m, "IdAligner",
                        "align_ids_batch with the vocabularies, method, prefix modes and parameters bound once.")
      .def(py::init<const xt::Vocab&, const xt::Vocab&, const std::string&, int, int, int64_t, int64_t, int64_t,
                    int64_t>(),
           py::arg("student_vocab"), py::arg("teacher_vocab"), py::arg("method") = "auto",
           py::arg("student_prefix") = 0, py::arg("teacher_prefix") = 0, XT_PARAMS_ARGS,
           py::keep_alive<1, 2>(), py::keep_alive<1, 3>())
      .def("align", &IdAligner::align, py::arg("student_ids"), py::arg("teacher_ids"),
           "One pair of id sequences -> (chunks [K,4], correct [K]).")
      .def("align_batch", &IdAligner::align_batch, py::arg("student_ids"), py::arg("teacher_ids"),
           py::arg("threads") = 0, "B pairs -> (chunks [K,4], correct [K], offsets [B+1]), as align_ids_batch.");

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
