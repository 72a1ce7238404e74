// docs/config.md is generated from the schema table by
// strata::config_schema_markdown(); this test fails when the committed file
// is stale. Regenerate with:
//   STRATA_UPDATE_DOCS=1 <build>/bin/test_config_docs
#include <strata/config.h>

#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

namespace {

std::filesystem::path docs_path() {
  // tests/cpp/unit/<this file> -> <repo>/docs/config.md
  return std::filesystem::path(__FILE__).parent_path().parent_path().parent_path().parent_path() /
         "docs" / "config.md";
}

TEST(ConfigDocs, MarkdownCoversEveryKey) {
  const std::string md = strata::config_schema_markdown();
  for (const auto& key : strata::config_schema()) {
    EXPECT_NE(md.find("`" + key.path + "`"), std::string::npos) << key.path;
  }
  EXPECT_NE(md.find("## Accepted but not acted on"), std::string::npos);
  EXPECT_NE(md.find("## Deprecated names"), std::string::npos);
}

TEST(ConfigDocs, CommittedFileMatchesTheSchema) {
  const std::filesystem::path path = docs_path();
  const std::string md = strata::config_schema_markdown();
  const char* update = std::getenv("STRATA_UPDATE_DOCS");
  if (update != nullptr && std::string(update) == "1") {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    ASSERT_TRUE(out.good()) << "cannot write " << path;
    out << md;
    out.close();
    ASSERT_TRUE(out.good()) << "write failed: " << path;
  }
  std::ifstream in(path, std::ios::binary);
  ASSERT_TRUE(in.good()) << path << " is missing; run STRATA_UPDATE_DOCS=1 test_config_docs";
  std::stringstream ss;
  ss << in.rdbuf();
  EXPECT_TRUE(ss.str() == md) << path
                              << " is stale: regenerate it with STRATA_UPDATE_DOCS=1 "
                                 "test_config_docs";
}

}  // namespace
