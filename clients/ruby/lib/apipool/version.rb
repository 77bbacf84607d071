# frozen_string_literal: true

module Apipool
  # The gem's version; it follows the Python package's (pyproject.toml).
  VERSION = "0.1.0"
end
