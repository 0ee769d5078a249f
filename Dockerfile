# The Stateward image: one static binary (`stateward`) that runs the manager
# (`stateward run`) and, in Jobs, the data mover (`stateward agent`).
#
# Build: docker build -t ghcr.io/stateward/stateward:dev .
# (Our own machines have no Docker engine; tests run the binary directly on the local
# cluster's node, which maps the image name `stateward` to the built binary.)

FROM rust:1.95-bookworm AS build
RUN rustup target add x86_64-unknown-linux-musl && apt-get update && apt-get install -y --no-install-recommends musl-tools && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p stateward-manager \
 && cp target/x86_64-unknown-linux-musl/release/stateward /stateward

FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /stateward /usr/local/bin/stateward
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/stateward"]
CMD ["run"]
